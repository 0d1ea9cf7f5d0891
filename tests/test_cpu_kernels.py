"""cpu_kernels: every candidate is a correct linear (eager and compiled, one token and several), a model can be
given any candidate from Python and the CLI, and a measured choice is cached per machine and never reused on
another CPU. References: float32 F.linear on the same bf16 weights, and the model's own addmv path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
from checkpoint import load_model
from decoding import cpu_inductor
from model import Linear

ROOT = Path(__file__).resolve().parent.parent
# bf16 inputs and weights, float32 accumulation in every kernel: the outputs differ from the float32 product by
# the rounding of the bf16 result (8 bits of mantissa: 2^-8 relative) and of the products' sums
BF16_RTOL = 2 ** -7


def check_close(got, ref):
    scale = ref.abs().max().item()
    assert (got.float() - ref).abs().max().item() <= BF16_RTOL * scale


@pytest.mark.parametrize("kernel", cpu_kernels.candidates(torch.bfloat16))
@pytest.mark.parametrize("tokens", [1, 5])
def test_every_candidate_is_a_correct_linear(kernel, tokens):
    torch.manual_seed(0)
    layer = Linear(96, 80).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2 if tokens > 1 else 1, tokens, 96, dtype=torch.bfloat16)
    ref = F.linear(x.float(), layer.weight.float())
    layer.use_kernel(kernel)
    assert layer.kernel == kernel
    with torch.no_grad():
        check_close(layer(x), ref)
        compiled = torch.compile(layer, fullgraph=True, backend=cpu_inductor())
        check_close(compiled(x), ref)


def test_float32_has_only_addmv_and_a_forced_missing_kernel_is_refused():
    assert cpu_kernels.candidates(torch.float32) == ["addmv"]
    assert cpu_kernels.choose([(8, 8)], torch.float32) == "addmv"
    with pytest.raises(ValueError, match="not available for float32"):
        cpu_kernels.choose([(8, 8)], torch.float32, force="onednn")


def test_model_with_each_kernel_gives_the_same_logits(hf_checkpoint, prompt_ids):
    _, d = hf_checkpoint("tied")  # tied: the output projection shares the embedding and keeps addmv
    idx = torch.tensor([prompt_ids(24, seed=3)])
    reference = load_model(d / "model.pth", "cpu", torch.float32)(idx)
    for kernel in cpu_kernels.candidates(torch.bfloat16):
        model = load_model(d / "model.pth", "cpu", torch.bfloat16, cpu_kernels=kernel)
        assert model.cpu_kernel == kernel and model.output.kernel == "addmv"
        assert {m.kernel for m in model.layers.modules() if isinstance(m, Linear)} == {kernel}
        logits = model(idx)
        # bf16 activations through 2 layers: a few percent of the logits' range
        assert (logits - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


def test_choice_is_cached_per_machine(tmp_path):
    cache = tmp_path / "cpu_kernels.json"
    other = "Some Other CPU | 2 threads | torch 0.0 | bfloat16 | [(64, 32)]"
    cache.write_text(json.dumps({other: {"kernel": "no-such-kernel", "g_weights_per_s": {}}}))
    chosen = cpu_kernels.choose([(64, 32)], torch.bfloat16, cache=cache)
    table = json.loads(cache.read_text())
    if len(cpu_kernels.candidates(torch.bfloat16)) == 1:  # e.g. AVX2 without AVX-512: nothing to choose between
        assert chosen == "addmv" and list(table) == [other]  # so nothing measured, nothing cached
        return
    ours = [k for k in table if k != other]
    assert len(ours) == 1 and ours[0].startswith(cpu_kernels.machine_key())  # measured here, not taken from `other`
    rates = table[ours[0]]["g_weights_per_s"]
    assert set(rates) == set(cpu_kernels.candidates(torch.bfloat16)) and all(r > 0 for r in rates.values())
    assert chosen == table[ours[0]]["kernel"] == max(rates, key=rates.get)
    table[ours[0]]["kernel"] = "addmv"  # a cached choice for this machine is used as it is, without measuring
    cache.write_text(json.dumps(table))
    assert cpu_kernels.choose([(64, 32)], torch.bfloat16, cache=cache) == "addmv"
    assert json.loads(cache.read_text()) == table


@pytest.mark.parametrize("kernel", ["auto", *cpu_kernels.candidates(torch.bfloat16)])
def test_cli_forces_each_kernel(hf_checkpoint, tmp_path, kernel):
    _, d = hf_checkpoint("gqa")
    metrics = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(d / "model.pth"),
                           "--device", "cpu", "--precision", "bfloat16", "--cpu_kernels", kernel, "--prompt", "the",
                           "--max_new_tokens", "4", "--num_samples", "1", "--temperature", "0",
                           "--metrics_json", str(metrics)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen = json.loads(metrics.read_text())["cpu_kernel"]
    assert chosen == kernel if kernel != "auto" else chosen in cpu_kernels.candidates(torch.bfloat16)


def test_cli_refuses_a_kernel_the_precision_has_not(hf_checkpoint):
    _, d = hf_checkpoint("gqa")
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(d / "model.pth"),
                           "--device", "cpu", "--precision", "float32", "--cpu_kernels", "onednn"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --cpu_kernels onednn: not available for float32 weights here; choose from auto, addmv"]
