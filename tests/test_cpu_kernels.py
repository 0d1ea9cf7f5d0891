"""cpu_kernels: every candidate is a correct linear (eager and compiled, one token and several), a model can be
given any candidate from Python and the CLI, and a measured choice is cached per machine and never reused on
another CPU; the opt-in w8a8 kernel of int8 layers is the integer math it specifies, row by row. References:
float32 F.linear on the same bf16 weights, the model's own addmv path, and w8a8's math written out in float64."""
import gc
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


@pytest.mark.parametrize("kernel", cpu_kernels.forcible(torch.bfloat16))
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


@pytest.mark.parametrize("K", [4096, 5632, 4099])
def test_generated_loop_sums_long_rows_in_parts(K):
    """Rows longer than cpu_kernels.SUM_CHUNK are summed in equal parts (5632: 2 x 2816; 4099, a prime: 4099 x 1),
    then the parts: the same product, compiled, for bf16 and int8 weights."""
    torch.manual_seed(0)
    w, x = torch.randn(16, K, dtype=torch.bfloat16), torch.randn(1, 1, K, dtype=torch.bfloat16)
    check_close(torch.compile(cpu_kernels.inductor, fullgraph=True, backend=cpu_inductor())(x, w),
                F.linear(x.float(), w.float()))
    q, scales = torch.randint(-127, 128, (16, K), dtype=torch.int8), torch.rand(16, dtype=torch.bfloat16)
    ref = x.double() @ (q.double() * scales.double()[:, None]).T
    got = torch.compile(cpu_kernels.inductor_int8, fullgraph=True, backend=cpu_inductor())(x, q, scales)
    assert (got.double() - ref).abs().max().item() <= BF16_RTOL * ref.abs().max().item()


def test_float32_has_only_addmv_and_a_forced_missing_kernel_is_refused():
    assert cpu_kernels.candidates(torch.float32) == ["addmv"]
    assert cpu_kernels.choose([(8, 8)], torch.float32) == "addmv"
    with pytest.raises(ValueError, match="not available for float32"):
        cpu_kernels.choose([(8, 8)], torch.float32, force="onednn")


def test_model_with_each_kernel_gives_the_same_logits(hf_checkpoint, prompt_ids):
    _, d = hf_checkpoint("tied")  # tied: the output projection shares the embedding and keeps addmv
    idx = torch.tensor([prompt_ids(24, seed=3)])
    reference = load_model(d / "model.pth", "cpu", torch.float32)(idx)
    for kernel in cpu_kernels.forcible(torch.bfloat16):
        model = load_model(d / "model.pth", "cpu", torch.bfloat16, cpu_kernels=kernel)
        assert model.cpu_kernel == kernel and model.output.kernel == "addmv"
        assert {m.kernel for m in model.layers.modules() if isinstance(m, Linear)} == {kernel}
        logits = model(idx)
        # bf16 activations through 2 layers: a few percent of the logits' range
        assert (logits - reference).abs().max().item() <= 0.05 * reference.abs().max().item()
        # one token in a compiled graph: where inductor's kernel is the generated loop instead of F.linear
        one = torch.compile(model, fullgraph=True, backend=cpu_inductor())(idx[:, :1])
        assert (one - reference[:, :1]).abs().max().item() <= 0.05 * reference.abs().max().item()


def test_choice_is_cached_per_machine(tmp_path):
    cache = tmp_path / "cpu_kernels.json"
    other = "Some Other CPU | 2 threads | torch 0.0 | bfloat16 | [(64, 32)]"
    cache.write_text(json.dumps({other: {"kernel": "no-such-kernel", "rates": {}}}))
    chosen = cpu_kernels.choose([(64, 32)], torch.bfloat16, cache=cache)
    table = json.loads(cache.read_text())
    if len(cpu_kernels.candidates(torch.bfloat16)) == 1:  # e.g. AVX2 without AVX-512: nothing to choose between
        assert chosen == "addmv" and list(table) == [other]  # so nothing measured, nothing cached
        return
    ours = [k for k in table if k != other]
    assert len(ours) == 1 and ours[0].startswith(cpu_kernels.machine_key())  # measured here, not taken from `other`
    rates = table[ours[0]]["rates"]
    # inductor is not measured here: eager it would be F.linear (step_kernels times it inside the compiled step)
    assert set(rates) == set(cpu_kernels.candidates(torch.bfloat16)) and all(r > 0 for r in rates.values())
    assert "inductor" not in rates and chosen == table[ours[0]]["kernel"] == max(rates, key=rates.get)
    table[ours[0]]["kernel"] = "addmv"  # a cached choice for this machine is used as it is, without measuring
    cache.write_text(json.dumps(table))
    assert cpu_kernels.choose([(64, 32)], torch.bfloat16, cache=cache) == "addmv"
    assert json.loads(cache.read_text()) == table


def test_machine_key_tells_cpus_with_one_model_name_apart():
    """Our VMs' "AMD EPYC" is an AVX2 Zen 3 or an AVX-512 Zen 5: the same name, kernels that differ 4x."""
    def cpuinfo(family, flags):
        one = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: 1\n" \
              f"model name\t: AMD EPYC\nflags\t\t: fpu sse2 {flags}\n"
        return "\n".join(one.format(i) for i in range(2))  # a processor per block; the first one counts
    zen3, zen5 = cpuinfo(25, "avx2 fma"), cpuinfo(26, "avx2 avx512f avx512_vnni avx512_bf16")
    assert cpu_kernels.machine_key(zen3) != cpu_kernels.machine_key(zen5)
    assert cpu_kernels.machine_key(zen3) == cpu_kernels.machine_key(cpuinfo(25, "fma avx2 sse4_2"))
    assert "family 26" in cpu_kernels.machine_key(zen5) and "avx512_bf16" in cpu_kernels.machine_key(zen5)


@pytest.mark.parametrize("kernel", ["auto", *cpu_kernels.forcible(torch.bfloat16)])
def test_cli_forces_each_kernel(hf_checkpoint, tmp_path, kernel):
    _, d = hf_checkpoint("gqa")
    metrics = tmp_path / "m.json"
    compiled = ["--compile"] if kernel == "inductor" else []  # its generated loop is in compiled steps only
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(d / "model.pth"),
                           "--device", "cpu", "--precision", "bfloat16", "--cpu_kernels", kernel, "--prompt", "the",
                           "--max_new_tokens", "4", "--num_samples", "1", "--temperature", "0", *compiled,
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


# ------------------------------------------------------------------ inductor on int8 layers (opt-in)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_inductor_kernel_is_the_dequantized_product(dtype):
    """Compiled, one token: the generated loop; eager or several tokens: ATen's int8 kernel. Both are x @ (W *
    scales).T in float32 arithmetic (reference in float64), rounded to the activations' dtype. 80 input features:
    rows padded to 96 for ATen's kernel, the padding multiplied by zeros."""
    from qlinear import Int8Linear
    torch.manual_seed(0)
    layer = Int8Linear(80, 64)
    layer.weight.copy_(torch.randint(-127, 128, (64, 80), dtype=torch.int8))
    layer.scales.copy_(torch.rand(64) * 0.01 + 1e-3)
    layer.scales = layer.scales.to(dtype)
    ref_w = layer.weight.double() * layer.scales.double()[:, None]
    layer.pack_for_device()
    layer.use_kernel("inductor")
    assert layer.kernel == "inductor" and layer.weight.shape == (64, 96)
    compiled = torch.compile(layer, fullgraph=True, backend=cpu_inductor())
    rtol = BF16_RTOL if dtype == torch.bfloat16 else 1e-5
    for tokens in (1, 5):
        x = torch.randn(1, tokens, 80, dtype=dtype)
        ref = x.double() @ ref_w.T
        for got in (layer(x), compiled(x)):
            assert got.dtype == dtype and (got.double() - ref).abs().max().item() <= rtol * ref.abs().max().item()
    with pytest.raises(ValueError, match="not available for int8 layers"):
        layer.use_kernel("w8a8")  # one opt-in kernel at a time


def test_int8_inductor_model_from_python_and_the_cli(quantized_copy, prompt_ids, tmp_path):
    """An int8 checkpoint loaded with cpu_kernels="inductor": every int8 layer takes it, and its compiled greedy
    decode gives the tokens of the weight-only model's eager one; from generate.py --cpu_kernels inductor."""
    from decoding import generate, make_steps
    from sampling import SamplingConfig
    path = quantized_copy("gqa", "--mode", "int8") / "model_int8.pth"
    model = load_model(path, "cpu", torch.float32, cpu_kernels="inductor")
    int8 = [m for m in model.modules() if getattr(m, "kernel", None) in cpu_kernels.INT8_KERNELS]
    assert model.cpu_kernel == "inductor" and int8 and {m.kernel for m in int8} == {"inductor"}
    reference = load_model(path, "cpu", torch.float32)
    prompt, greedy = prompt_ids(9, seed=7), SamplingConfig(temperature=0)
    expected = generate(reference, [prompt], 16, greedy).tokens
    assert generate(model, [prompt], 16, greedy, steps=make_steps("cpu", compile=True)).tokens == expected
    metrics = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(path),
                           "--device", "cpu", "--precision", "bfloat16", "--compile", "--cpu_kernels", "inductor",
                           "--prompt", "the", "--max_new_tokens", "4", "--num_samples", "1",
                           "--metrics_json", str(metrics)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(metrics.read_text())["cpu_kernel"] == "inductor"


# ------------------------------------------------------------------ w8a8: int8 layers with int8 activations (opt-in)
w8a8 = pytest.mark.skipif(not cpu_kernels.w8a8_library(), reason="neither oneDNN's u8s8 linear nor FBGEMM's is "
                                                                  "exact on this CPU")
LIBRARIES = [lib for lib, present in (("onednn", torch.backends.mkldnn.is_available()),
                                      ("fbgemm", "fbgemm" in torch.backends.quantized.supported_engines)) if present]


def w8a8_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """The format written out: each row rounded to integers at max |row| / levels (float32 division, as
    specified), the integer products summed exactly (float64), scaled by the row's and the channel's scales."""
    rows = x.reshape(-1, x.shape[-1]).float()
    s = rows.abs().amax(-1, keepdim=True) / levels
    q = torch.where(s > 0, torch.round(rows / s.clamp(min=1e-38)), 0)
    return (q.double() @ w.double().T) * s.double() * scales.double()


def check_w8a8_linear(w, library):
    torch.manual_seed(0)
    scales = torch.rand(w.shape[0]) * 0.01 + 1e-3
    x = torch.randn(4, w.shape[1]) * torch.tensor([[1.0], [30.0], [0.0], [1e-3]])  # very different rows, one zero
    packed = cpu_kernels.w8a8_pack(w, library)
    ref = w8a8_reference(x, w, scales, cpu_kernels.W8A8_LEVELS[library])
    got = cpu_kernels.w8a8_linear(x, packed, scales, library)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert torch.equal(got[2], torch.zeros(w.shape[0]))
    for i in range(4):  # a row's result does not depend on the others (serving batches rows of many requests)
        assert torch.equal(cpu_kernels.w8a8_linear(x[i:i + 1], packed, scales, library)[0], got[i])
    compiled = torch.compile(cpu_kernels.w8a8_linear, fullgraph=True, backend=cpu_inductor())
    assert torch.allclose(compiled(x, packed, scales, library).double(), ref, rtol=1e-5,
                          atol=1e-6 * ref.abs().max().item())
    # against the weight-only int8 layer: the activations' rounding, 1/(2 levels) of a row's range at most per element
    weight_only = (x.double() @ w.double().T) * scales.double()
    assert (got.double() - weight_only).norm() <= 0.02 * weight_only.norm()


@w8a8
def test_w8a8_linear_is_the_integer_math_and_each_row_its_own():
    """The library this CPU runs, on weights of every int8 value: products of 127 x 127 included."""
    check_w8a8_linear(torch.randint(-127, 128, (80, 96), dtype=torch.int8), cpu_kernels.w8a8_library())


@pytest.mark.parametrize("library", LIBRARIES)
def test_every_w8a8_library_is_the_integer_math_where_nothing_saturates(library):
    """Both libraries' wiring, on any CPU that runs them: weights within +-8 and 75 input features (not a multiple
    of the kernels' blocks), so that no 16-bit pair sum can saturate even where the library is not exact."""
    check_w8a8_linear(torch.randint(-8, 9, (48, 75), dtype=torch.int8), library)


@w8a8
def test_w8a8_model_from_python_and_the_cli(hf_checkpoint, prompt_ids, tmp_path):
    """An int8 checkpoint loaded with cpu_kernels="w8a8": every int8 layer prepacked for its library, logits within
    the activations' rounding of the weight-only int8 model's, a batch decoding as each prompt alone, compiled as
    eager; from generate.py --cpu_kernels w8a8 with --compile."""
    from decoding import generate, make_steps
    from qlinear import quantize_model
    from sampling import SamplingConfig
    _, d = hf_checkpoint("gqa")
    state, meta = quantize_model(load_model(d / "model.pth", "cpu", torch.float32, cpu_kernels="addmv"), "int8",
                                 progress=False)
    path = tmp_path / "model_int8.pth"
    torch.save({"quantization": meta, "state_dict": state}, path)
    (tmp_path / "model_config.json").write_text((d / "model_config.json").read_text())
    weight_only = load_model(path, "cpu", torch.float32)
    model = load_model(path, "cpu", torch.float32, cpu_kernels="w8a8")
    assert model.cpu_kernel == "w8a8"
    int8 = [m for m in model.modules() if getattr(m, "kernel", None) in cpu_kernels.INT8_KERNELS]
    assert int8 and {(m.kernel, m.library) for m in int8} == {("w8a8", cpu_kernels.w8a8_library())}
    idx = torch.tensor([prompt_ids(24, seed=5)])
    with torch.inference_mode():
        ref, got = weight_only(idx), model(idx)
    levels = cpu_kernels.W8A8_LEVELS[cpu_kernels.w8a8_library()]  # the rounding error scales with 1 / levels
    assert (got - ref).norm() <= 0.05 * 127 / levels * ref.norm()
    prompts = [prompt_ids(n, seed=50 + n) for n in (7, 19, 12)]
    greedy = SamplingConfig(temperature=0)
    alone = [generate(model, [p], 12, greedy).tokens[0] for p in prompts]
    assert generate(model, prompts, 12, greedy).tokens == alone
    assert generate(model, prompts[:1], 12, greedy, steps=make_steps("cpu", compile=True)).tokens == alone[:1]
    metrics = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(path),
                           "--tokenizer_path", str(d / "tokenizer.model"), "--device", "cpu", "--compile",
                           "--cpu_kernels", "w8a8", "--prompt", "the", "--max_new_tokens", "4", "--num_samples", "1",
                           "--metrics_json", str(metrics)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(metrics.read_text())["cpu_kernel"] == "w8a8"


def mapped(path: Path) -> bool:
    """Whether this process still has the file memory-mapped (torch.load(mmap=True) keeps it so while any tensor
    points into it, and every page that was read stays resident with it)."""
    gc.collect()
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_converted_weights_let_the_checkpoint_file_go(hf_checkpoint, quantized_copy, tmp_path):
    """Weights converted on load (prepacked for oneDNN, int4-packed) are copies: the file mapping they were read
    from must go, or the model is resident twice. Weights used as stored (addmv, inductor) are read from the
    mapping."""
    _, d = hf_checkpoint("tied")
    path = tmp_path / "model.pth"
    torch.save({k: v.bfloat16() for k, v in torch.load(d / "model.pth", weights_only=True).items()}, path)
    (tmp_path / "model_config.json").write_text((d / "model_config.json").read_text())
    for kernel in cpu_kernels.forcible(torch.bfloat16):
        model = load_model(path, "cpu", torch.bfloat16, cpu_kernels=kernel)
        assert mapped(path) == (kernel in ("addmv", "inductor")), kernel
        del model
        assert not mapped(path)
    path = quantized_copy("mha", "--mode", "int4", "--groupsize", "32") / "model_int4.g32.pth"
    model = load_model(path, "cpu", torch.float32)
    assert not mapped(path)
