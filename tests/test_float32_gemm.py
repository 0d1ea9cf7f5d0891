"""Several-token matmuls of 16-bit models in float32 (cpu_kernels.float32_gemm, --cpu_gemm): the result is the
float32 product of the same weights, for float, int8 and int4 layers, whichever slices the weights are converted
in; the choice is forced from Python and the CLI, or measured once per machine and cached. References: the product
in float64 (or float32 F.linear) of the weights as stored, and the float32 model."""
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
from qlinear import CPU_INT4_BLOCK, Int4Linear, Int8Linear, int4_qparams, pack_int4, quantize_int4, quantize_int8

ROOT = Path(__file__).resolve().parent.parent
BF16_RTOL = 2 ** -7  # float32 products and sums, then one rounding to bf16 (8 bits of mantissa)


def check_close(got, ref, rtol=BF16_RTOL):
    assert (got.double() - ref.double()).abs().max().item() <= rtol * ref.abs().max().item()


def test_float_layer_from_its_token_count_is_the_float32_product():
    """1024 input features: float32_gemm converts 1024 rows at a time (CHUNK_BYTES), so 2500 rows are three
    slices, the last one short."""
    torch.manual_seed(0)
    layer = Linear(1024, 2500).to(torch.bfloat16).requires_grad_(False)
    layer.float32_from = 8
    compiled = torch.compile(layer, fullgraph=True, backend=cpu_inductor())
    for tokens in (1, 4, 8, 40):  # below float32_from: the layer's kernel; from it on: float32
        x = torch.randn(1, tokens, 1024, dtype=torch.bfloat16)
        ref = F.linear(x.float(), layer.weight.float())
        with torch.profiler.profile() as prof:
            got = layer(x)
        mms = sum(e.count for e in prof.key_averages() if e.key == "aten::mm")  # one per slice in float32
        assert mms == (3 if tokens >= 8 else 1 if tokens > 1 else 0)  # one token: addmv
        for got in (got, compiled(x)):
            assert got.dtype == torch.bfloat16 and got.shape == (1, tokens, 2500)
            check_close(got, ref)


def int8_layer(K, N):
    w = torch.randn(N, K) * 0.02
    layer = Int8Linear(K, N)
    q, scales = quantize_int8(w)
    layer.weight.copy_(q)
    layer.scales.copy_(scales)
    return layer, q.double() * scales.double()[:, None]


def int4_layer(K, N, groupsize=32):
    w = torch.randn(N, K) * 0.02
    layer = Int4Linear(K, N, groupsize)
    qparams = int4_qparams(w, groupsize)
    codes = quantize_int4(w, qparams, groupsize)
    layer.weight.copy_(pack_int4(codes))
    layer.scales_and_zeros.copy_(qparams.transpose(0, 1))
    scales, zeros = qparams.double().repeat_interleave(groupsize, 1).unbind(-1)
    return layer, (codes.double() - 8) * scales + zeros


@pytest.mark.parametrize("make", [int8_layer, int4_layer])
def test_quantized_layer_many_tokens_in_float32_is_the_dequantized_product(make):
    """From the layer's GEMM_TOKENS on, with float32_from set, the weights are dequantized to float32 512 rows at
    a time: 1040 rows are two whole slices (whole blocks of the int4 CPU layout) and a 16-row tail (the layout's
    short last block where it packs blocks of 32 or 64 rows)."""
    if make is int4_layer and CPU_INT4_BLOCK is None:
        pytest.skip("this CPU's int4 packing is not one qlinear can unpack (it then always uses the kernel)")
    torch.manual_seed(0)
    layer, ref_w = make(2048, 1040)
    layer.to(torch.bfloat16).pack_for_device()
    tokens = layer.GEMM_TOKENS[1]
    x = torch.randn(tokens, 2048, dtype=torch.bfloat16)
    ref = x.double() @ ref_w.T
    native = layer(x)  # dequantized to bf16, bf16 GEMM
    layer.float32_from = 8
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, 1040)
    # int4's bf16 scales and zeros round the weights as the kernel sees them in both ways
    check_close(got, ref, BF16_RTOL if make is int8_layer else 2 ** -5)
    check_close(got, native.double(), 2 ** -6)
    # the float32 product of the weights as the layer holds them, rounded once: all but the rare element a
    # different summation order rounds the other way (the bf16-weight GEMM matched 50-58% on a Zen 3)
    rounded = F.linear(x.float(), layer.dequantized(torch.float32)).bfloat16()
    assert (got == rounded).float().mean().item() >= 0.99


def test_float32_from_forced_or_measured_once_per_machine(tmp_path):
    bf16 = torch.bfloat16
    assert cpu_kernels.float32_from(bf16, "native") is None and cpu_kernels.float32_from(bf16, "float32") == 2
    assert cpu_kernels.float32_from(bf16, 16) == 16  # rank 0's answer, passed on under tensor parallelism
    assert cpu_kernels.float32_from(torch.float32, "float32") is None  # float32 models: nothing to convert
    cache = tmp_path / "cpu_kernels.json"
    other = "Some Other CPU | 2 threads | torch 0.0 | bfloat16 | GEMM of 8 tokens"
    cache.write_text(json.dumps({other: {"kernel": "float32", "rates": {}}}))
    measured = cpu_kernels.float32_from(bf16, cache=cache)
    table = json.loads(cache.read_text())
    ours = [k for k in table if k != other]
    assert ours and all(k.startswith(cpu_kernels.machine_key()) for k in ours)  # measured here, not taken from other
    first = f"{cpu_kernels.machine_key()} | bfloat16 | GEMM of {cpu_kernels.GEMM_TOKENS[0]} tokens"
    assert first in table and set(table[first]["rates"]) == {"native", "float32"}
    winners = [n for n in cpu_kernels.GEMM_TOKENS if table.get(f"{first[:first.rindex('GEMM')]}GEMM of {n} tokens",
                                                                  {}).get("kernel") == "float32"]
    assert measured == (winners[0] if winners else None)
    table[first]["kernel"] = "float32"  # a cached answer is used as it is, without measuring
    cache.write_text(json.dumps(table))
    assert cpu_kernels.float32_from(bf16, cache=cache) == cpu_kernels.GEMM_TOKENS[0]
    assert json.loads(cache.read_text()) == table


def test_model_in_float32_gemm_from_python(hf_checkpoint, prompt_ids):
    _, d = hf_checkpoint("gqa")
    idx = torch.tensor([prompt_ids(24, seed=5)])
    reference = load_model(d / "model.pth", "cpu", torch.float32)(idx)
    assert load_model(d / "model.pth", "cpu", torch.float32, cpu_gemm="float32").cpu_gemm_from is None
    for gemm, expected in (("native", None), ("float32", 2)):
        model = load_model(d / "model.pth", "cpu", torch.bfloat16, cpu_gemm=gemm)
        assert model.cpu_gemm_from == expected
        assert {m.float32_from for m in model.modules() if isinstance(m, Linear) and m.kernel != "onednn"} == {expected}
        logits = model(idx)
        # bf16 activations through 2 layers: a few percent of the logits' range
        assert (logits - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


@pytest.mark.parametrize("gemm", ["auto", "native", "float32"])
def test_cli_forces_the_gemm(hf_checkpoint, tmp_path, gemm):
    _, d = hf_checkpoint("gqa")
    metrics = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(d / "model.pth"),
                           "--device", "cpu", "--cpu_gemm", gemm, "--prompt", "the cat sat on the mat and",
                           "--max_new_tokens", "4", "--num_samples", "1", "--temperature", "0",
                           "--metrics_json", str(metrics)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen = json.loads(metrics.read_text())["cpu_gemm_from"]
    assert chosen == {"native": None, "float32": 2}.get(gemm, chosen)
    assert gemm != "auto" or chosen in (None, *cpu_kernels.GEMM_TOKENS)
