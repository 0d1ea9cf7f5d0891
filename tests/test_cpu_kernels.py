"""llama_fast/cpu/kernels.py and layers.py: every kernel --cpu_kernels can name is a correct linear in a CpuLinear
(eager and compiled, one token and several), inductor's generated loop sums long rows in parts, the int8 layers'
inductor kernel is the dequantized product, the opt-in w8a8 kernel is the integer math it specifies, row by row, and
several-token matmuls of 16-bit layers in float32 (float32_gemm) are the float32 product of the same weights, for
float, int8 and int4 layers. References: float32 F.linear on the same bf16 weights, the product in float64, and
w8a8's math written out in float64. Which kernel a model gets is test_cpu_choice.py's; measuring, test_cpu_tune.py's."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decoding import cpu_inductor
from llama_fast.cpu import kernels as cpu_kernels
from llama_fast.cpu.layers import CpuLinear
from llama_fast.quant.qlinear import (CPU_INT4_BLOCK, Int4Linear, Int8Linear, int4_qparams, pack_int4, quantize_int4,
                                      quantize_int8)

# bf16 inputs and weights, float32 accumulation in every kernel: the outputs differ from the float32 product by
# the rounding of the bf16 result (8 bits of mantissa: 2^-8 relative) and of the products' sums
BF16_RTOL = 2 ** -7


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean slate: CpuLinear.forward is one code object for every layer here, and dynamo
    stops recompiling one after 8 graphs (fullgraph then fails); the kernels' tests together compile it ten times."""
    torch._dynamo.reset()
    yield


def check_close(got, ref, rtol=BF16_RTOL):
    assert (got.double() - ref.double()).abs().max().item() <= rtol * ref.abs().max().item()


def bf16_linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).requires_grad_(False)


@pytest.mark.parametrize("kernel", cpu_kernels.forcible(torch.bfloat16))
@pytest.mark.parametrize("tokens", [1, 5])
def test_every_candidate_is_a_correct_linear(kernel, tokens):
    torch.manual_seed(0)
    linear = bf16_linear(96, 80)
    x = torch.randn(2 if tokens > 1 else 1, tokens, 96, dtype=torch.bfloat16)
    ref = F.linear(x.float(), linear.weight.float())
    layer = CpuLinear(linear, kernel)
    assert layer.kernel == kernel and layer.float32_from is None
    assert (layer.in_features, layer.out_features, layer.bias) == (96, 80, None)
    # the loaded weight itself unless the kernel prepares (prepacks) it
    prepare, _ = cpu_kernels.KERNELS[kernel]
    assert (layer.weight is linear.weight) == (prepare is None)
    with torch.no_grad():
        check_close(layer(x), ref)
        compiled = torch.compile(layer, fullgraph=True, backend=cpu_inductor())
        check_close(compiled(x), ref)


@pytest.mark.skipif("onednn" not in cpu_kernels.candidates(torch.bfloat16), reason="oneDNN cannot pack bf16 here")
def test_a_several_token_kernel_beside_the_loop():
    """CpuLinear(kernel="inductor", several="onednn") (choice.several_for): one token runs the loop on the loaded
    weight, several run oneDNN on a prepacked copy that the state dict leaves out, and float32_from still comes
    first. Each path gives bit for bit what the layer of that one kernel gives."""
    torch.manual_seed(0)
    linear = bf16_linear(96, 80)
    one, several = torch.randn(1, 1, 96, dtype=torch.bfloat16), torch.randn(2, 5, 96, dtype=torch.bfloat16)
    layer = CpuLinear(linear, "inductor", several="onednn")
    assert layer.weight is linear.weight and layer.several_weight.is_mkldnn
    assert set(layer.state_dict()) == {"weight"}
    with torch.no_grad():
        loop = torch.compile(CpuLinear(linear, "inductor"), fullgraph=True, backend=cpu_inductor())(one)
        compiled = torch.compile(layer, fullgraph=True, backend=cpu_inductor(), dynamic=True)
        assert torch.equal(compiled(one), loop)
        onednn = CpuLinear(linear, "onednn")(several)
        assert torch.equal(layer(several), onednn) and torch.equal(compiled(several), onednn)
        check_close(onednn, F.linear(several.float(), linear.weight.float()))
        in_float32 = CpuLinear(linear, "inductor", float32_from=4)(several)
        assert torch.equal(CpuLinear(linear, "inductor", float32_from=4, several="onednn")(several), in_float32)
    with pytest.raises(ValueError, match="reads a copy it prepares"):
        CpuLinear(linear, "inductor", several="addmv")


@pytest.mark.parametrize("K", [4096, 5632, 4099])
def test_generated_loop_sums_long_rows_in_parts(K):
    """Rows longer than kernels.SUM_CHUNK are summed in equal parts (5632: 2 x 2816; 4099, a prime: 4099 x 1),
    then the parts: the same product, compiled, for bf16 and int8 weights."""
    torch.manual_seed(0)
    w, x = torch.randn(16, K, dtype=torch.bfloat16), torch.randn(1, 1, K, dtype=torch.bfloat16)
    check_close(torch.compile(cpu_kernels.inductor, fullgraph=True, backend=cpu_inductor())(x, w),
                F.linear(x.float(), w.float()))
    q, scales = torch.randint(-127, 128, (16, K), dtype=torch.int8), torch.rand(16, dtype=torch.bfloat16)
    ref = x.double() @ (q.double() * scales.double()[:, None]).T
    got = torch.compile(cpu_kernels.inductor_int8, fullgraph=True, backend=cpu_inductor())(x, q, scales)
    check_close(got, ref)


def test_float32_weights_have_only_addmv():
    """oneDNN's prepacked path and inductor's loop are for 16-bit weights: float32 ones can be given addmv only
    (choose_kernels refuses the others: test_cpu_choice.py)."""
    assert cpu_kernels.candidates(torch.float32) == ["addmv"]
    assert cpu_kernels.forcible(torch.float32) == ["addmv"]
    assert cpu_kernels.forcible(torch.bfloat16) == cpu_kernels.candidates(torch.bfloat16) + ["inductor"]
    assert set(cpu_kernels.forcible(torch.bfloat16)) <= set(cpu_kernels.KERNELS)


# ------------------------------------------------------------------ inductor on int8 layers
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_inductor_kernel_is_the_dequantized_product(dtype):
    """Compiled, one token: the generated loop; eager or several tokens: ATen's int8 kernel. Both are x @ (W *
    scales).T in float32 arithmetic (reference in float64), rounded to the activations' dtype. 80 input features:
    rows padded to 96 for ATen's kernel, the padding multiplied by zeros."""
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


# ------------------------------------------------------------------ several tokens in float32 (float32_gemm)
def test_float_layer_from_its_token_count_is_the_float32_product():
    """A CpuLinear with float32_from = 8. 1024 input features: float32_gemm converts 1024 rows at a time
    (CHUNK_BYTES), so 2500 rows are three slices, the last one short."""
    assert cpu_kernels.CHUNK_BYTES // (4 * 1024) == 1024
    torch.manual_seed(0)
    layer = CpuLinear(bf16_linear(1024, 2500), "addmv", float32_from=8)
    assert layer.float32_from == 8
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
