"""scripts/bench_gemv.py runs on the model's own layers and reports one line per kernel (speed lives in BENCHMARKS.md;
here only that it runs and refuses shapes the int4 packer cannot take)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpu_kernels import candidates

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
        bf16 = ["bf16"] * len(candidates(torch.bfloat16))  # one line per CPU kernel cpu_kernels chooses from
        # each quantized format: its kernel, then dequantize + F.linear
        assert [r[0] for r in rates] == [*bf16, "int8", "int8", "int4 g32", "int4 g32", "int4 g128", "int4 g128"], \
            proc.stdout
        assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rates)
        assert "read bandwidth" in proc.stdout


@pytest.mark.parametrize("mistake", [["--in_features", "100"], ["--tokens", "0"]])
def test_refuses_shapes_the_kernels_cannot_take(mistake):
    proc = run(*mistake)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
