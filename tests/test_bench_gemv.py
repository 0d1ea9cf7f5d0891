"""scripts/bench_gemv.py and scripts/bench_attention.py run on the model's own kernels and report one line per
kernel (speed lives in BENCHMARKS.md; here only that they run and refuse what they cannot take); and
scripts/bench_llamacpp.py reuses a work folder only for the preset it holds; scripts/bench_cuda_linear.py (GPU only,
scripts/gpu_check.sh runs it) refuses what it cannot do with one line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_fast.cpu import kernels as cpu_kernels
from llama_fast.cpu.kernels import forcible

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, "scripts/bench_gemv.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_reports_every_kernel_streamed_and_cached():
    for extra in ([], ["--cached"], ["--tokens", "3"]):
        proc = run("--out_features", "64", "--in_features", "256", "--stream_bytes", "1e5", "--repeats", "1",
                   "--groupsizes", "32", "128", "--threads", "1", *extra)
        assert proc.returncode == 0, proc.stderr
        rates = re.findall(r"^(bf16|int8|int4 g\d+) .*?([\d.]+) G weights/s +([\d.]+) GB/s$", proc.stdout, re.M)
        # one line per CPU kernel --cpu_kernels can name, then the float32 GEMM (--cpu_gemm float32)
        bf16 = ["bf16"] * (len(forcible(torch.bfloat16)) + 1)
        # each quantized format: its kernel, then dequantize to bf16 + F.linear and to float32 + GEMM;
        # int8 then inductor and w8a8
        int8 = ["int8"] * (5 if cpu_kernels.w8a8_library() else 4)
        assert [r[0] for r in rates] == [*bf16, *int8, *["int4 g32"] * 3, *["int4 g128"] * 3], proc.stdout
        assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rates)
        assert "read bandwidth" in proc.stdout


@pytest.mark.parametrize("mistake", [["--in_features", "100"], ["--tokens", "0"]])
def test_refuses_shapes_the_kernels_cannot_take(mistake):
    proc = run(*mistake)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_bench_attention_reports_both_kernels_and_refuses_bad_sizes():
    """scripts/bench_attention.py (SDPA against llama_fast.cpu.layers.attend_one): one table row per configuration,
    both timed."""
    proc = subprocess.run([sys.executable, "scripts/bench_attention.py", "--head_dim", "16", "--n_rep", "1", "2",
                           "--keys", "24", "--layers", "2", "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\| (\d+) x (\d+) \| 16 \| 24 \| (\d+) \| (\d+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [(r[0], r[1]) for r in rows] == [("16", "1"), ("8", "2")], proc.stdout
    assert all(int(r[2]) > 0 and int(r[3]) > 0 for r in rows)  # both timed (their ratio, rounded, can be 0.00)
    bad = subprocess.run([sys.executable, "scripts/bench_attention.py", "--keys", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip() == "error: --keys must be >= 1, got 0", bad.stderr


def test_bench_cuda_linear_refuses_bad_sizes_and_a_machine_without_cuda():
    def run_it(*args):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU seen, on any machine
        return subprocess.run([sys.executable, "scripts/bench_cuda_linear.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env)
    bad = run_it("--layers", "0")
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.strip() == "error: --layers, --out_features and --in_features must be >= 1"
    none = run_it()
    assert none.returncode == 1 and none.stderr.strip() == "error: no CUDA device is present", none.stderr


def test_llamacpp_work_dir_is_reused_only_by_the_same_preset(tmp_path):
    """scripts/bench_llamacpp.py keeps its converted models in --work_dir for later runs: a run of another preset
    must not benchmark them under its own name."""
    from scripts.bench_llamacpp import check_work_dir
    check_work_dir(tmp_path / "w", "stories110M")  # a new folder: made and marked
    (tmp_path / "w" / "hf").mkdir()
    check_work_dir(tmp_path / "w", "stories110M")  # the same preset again: reused
    with pytest.raises(SystemExit, match="holds stories110M's models, not tinyllama-1.1b's"):
        check_work_dir(tmp_path / "w", "tinyllama-1.1b")
    (tmp_path / "old" / "hf").mkdir(parents=True)  # models from before the mark existed: whose is unknown
    with pytest.raises(SystemExit, match="models of an unknown preset"):
        check_work_dir(tmp_path / "old", "stories110M")
