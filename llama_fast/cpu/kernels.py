"""CPU matmul kernels: what a layer's matmul can be on a CPU. Which one a model's layers use is choice.py's.

- addmv: ATen's GEMV for one token (F.linear for several).
- onednn: oneDNN's linear on a prepacked weight; on an AMD EPYC with AVX-512 it streams a bf16 weight 2.5-3x faster
  than addmv (on an Intel Xeon with AMX addmv won).
- inductor: in a compiled step, a one-token matmul written as a multiply and a sum, which inductor generates as a
  loop inside the layer's fused C++ kernel: no call into a library, whose fixed cost (~20-35 us a oneDNN call) is a
  sixth of a small model's step (stories110M bf16: 1.3x oneDNN's decode; tinyllama: 0.9x). inductor_int8 is the
  same for int8 weights.
- w8a8 (int8 layers, opt-in: it changes the numerics): activations quantized per token too, then an integer kernel
  (oneDNN's where it is exact, with AVX-512 VNNI; FBGEMM's on AVX2).
- float32_gemm: several tokens at once (prefill, a batch) where this CPU's 16-bit GEMM is the slow one: without
  AVX-512 BF16 (an AVX2 Zen 3) ATen's bf16 GEMM ran at ~20 GFLOP/s and float32's at ~150, so 16-bit weights are
  converted to float32 a slice at a time and multiplied in float32.

A new kernel is an entry of KERNELS (how to prepare a weight, how to multiply), correct for any number of tokens,
and callable from a compiled graph without Python per layer where possible.
"""
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

ONEDNN_DTYPES = (torch.bfloat16, torch.float16)  # oneDNN's prepacked path is for 16-bit weights here


OPS = torch.library.Library("llama_fast", "DEF")  # the ops below (kept alive: they are registered through it)


def extern_op(schema: str, fake):
    """Make fn the op llama_fast::<schema>, which a compiled graph calls as one extern kernel (inductor's own
    lowerings of these library calls take only weights its freezing pass packed, or none at all); fake gives its
    output's shape. Registered with torch.library.Library, not torch.library.custom_op, whose Python wrapper costs
    20-25 us a call: FBGEMM's one-row linear took 29 us called directly, 31-35 through this, 50-60 through
    custom_op, and a stories110M step makes 49 such calls."""
    def register(fn):
        name = schema.split("(")[0]
        OPS.define(schema)
        OPS.impl(name, fn, "CompositeExplicitAutograd")  # every backend: oneDNN's packed weights are MkldnnCPU
        torch.library.register_fake(f"llama_fast::{name}", fake, lib=OPS)
        return getattr(torch.ops.llama_fast, name)
    return register


@extern_op("onednn_linear(Tensor x, Tensor packed_weight) -> Tensor",
           lambda x, packed_weight: x.new_empty(*x.shape[:-1], packed_weight.shape[0]))
def onednn_linear(x: Tensor, packed_weight: Tensor) -> Tensor:
    """x @ W.T with W prepacked by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")


@extern_op("onednn_int8_linear(Tensor qx, Tensor packed_weight, Tensor scales, Tensor zero_points) -> Tensor",
           lambda qx, packed_weight, scales, zero_points: qx.new_empty(qx.shape[0], scales.shape[0],
                                                                       dtype=torch.float32))
def onednn_int8_linear(qx: Tensor, packed_weight: Tensor, scales: Tensor, zero_points: Tensor) -> Tensor:
    """(qx - 128) @ W.T * scales in float32: qx (M, K) uint8, W int8 prepacked by oneDNN (qlinear_prepack), scales
    (N,) float32 per output channel, zero_points (N,) int64 zeros."""
    return torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed_weight, scales, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@extern_op("fbgemm_int8_linear(Tensor q, Tensor weight) -> Tensor",
           lambda q, weight: q.new_empty(q.shape[0], weight.shape[0]))
def fbgemm_int8_linear(q: Tensor, weight: Tensor) -> Tensor:
    """q @ W.T in float32, for q (M, K) float32 whose entries are integers in [-64, 63], each row holding both ends
    (w8a8_linear makes them so): FBGEMM's dynamic linear quantizes q per tensor to 7 bits (reduce_range, so that
    AVX2's 16-bit pair sums of 127 x 127 cannot saturate), which for that range is scale 1 and zero point 64:
    exactly q. W (N, K) int8 rides on `weight` as weight.fbgemm_packed (fbgemm_pack): FBGEMM's packing is a
    TorchScript object, which a compiled graph cannot pass to an op, while the tensor carrying it can."""
    return torch.ops.quantized.linear_dynamic(q, weight.fbgemm_packed, True)


def fbgemm_pack(weight: Tensor) -> Tensor:
    """A stand-in for weight (N, K) int8 that carries FBGEMM's packing of it (one byte of storage: the packing holds
    the only copy of the weights, so a w8a8 layer costs no more memory than a weight-only one)."""
    n = weight.shape[0]
    with warnings.catch_warnings():  # "quantized tensors will be removed in a future PyTorch release"
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight, torch.ones(n, dtype=torch.float64),
                                                     torch.zeros(n, dtype=torch.int64), 0)
        engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "fbgemm"
        try:  # the engine decides whose packing linear_prepack makes: FBGEMM's, whose reduce_range we rely on
            packed = torch.ops.quantized.linear_prepack(q, None)
        finally:
            torch.backends.quantized.engine = engine
    carrier = weight.new_zeros(()).expand(weight.shape)
    carrier.fbgemm_packed = packed
    return carrier


W8A8_LEVELS = {"onednn": 127, "fbgemm": 63}  # each row rounded to multiples of max |row| / levels


def w8a8_pack(weight: Tensor, library: str) -> Tensor:
    """weight (N, K) int8 prepared for w8a8_linear with `library`: oneDNN's prepacked (K, N) tensor, or FBGEMM's
    packing of the weight with two more columns of zeros (for the pins that w8a8_linear appends)."""
    if library == "onednn":
        return torch.ops.onednn.qlinear_prepack(weight, None)
    return fbgemm_pack(F.pad(weight, (0, 2)))


def w8a8_linear(x: Tensor, weight: Tensor, scales: Tensor, library: str) -> Tensor:
    """An int8 layer (weight from w8a8_pack, scales (N,) float32) with its activations quantized too
    (`--cpu_kernels w8a8`, opt-in): each token's row of x is scaled by its own max |x| / levels and rounded, so a
    row's result never depends on the other rows of a batch; the integer products are summed exactly in int32,
    then scaled back by the row's and the channel's scales.
    llama.cpp's Q8_0 works the same way (per block of 32). The weights are read as int8 and multiplied as int8 (no
    conversion to float per weight). Two libraries (w8a8_library: whichever is exact on this CPU):

    onednn: 127 levels (8 bits), oneDNN's u8s8 kernel (x shifted by 128 to uint8), exact with AVX-512 VNNI: 1.5-1.8x
            the weights/s of ATen's weight-only int8 kernel there (scripts/bench_gemv.py).
    fbgemm: 63 levels (7 bits), FBGEMM's dynamic linear, exact on AVX2 (fbgemm_int8_linear). FBGEMM quantizes x per
            tensor, not per row: two pins per row, 63 and -64 against zero weights, fix its range at [-64, 63],
            where its rounding is the identity on our already rounded rows."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = rows.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / W8A8_LEVELS[library]
    q = (rows / scale).round()  # |q| <= levels
    if library == "onednn":
        zero_points = torch.zeros_like(scales, dtype=torch.int64)
        y = onednn_int8_linear(q.add(128).to(torch.uint8), weight, scales, zero_points)
    else:
        # built here, not a module constant: dynamo failed on a global tensor in the engine's shared layer graph
        pins = q.new_tensor([63.0, -64.0]).expand(q.shape[0], 2)
        y = fbgemm_int8_linear(torch.cat([q, pins], -1), weight) * scales
    return (y * scale).to(x.dtype).view(*x.shape[:-1], -1)


@functools.cache
def w8a8_library() -> str | None:
    """The library that computes w8a8_linear exactly on this CPU, tried on a probe whose answer is known: oneDNN's
    (8 bits) first, then FBGEMM's (7 bits); None if neither. Without VNNI (an AVX2-only AMD EPYC) oneDNN's answers
    were wrong: 8160 for 64 products of 127 x 127 (multiply-adds into 16 bits saturate); FBGEMM's 7-bit activations
    are its way round that."""
    for library, levels in W8A8_LEVELS.items():
        gen = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (16, 64), dtype=torch.int8, generator=gen)
        w[0] = 127  # the largest sums: saturate 16-bit pair sums if the kernel has them
        x = torch.randint(-levels, levels + 1, (2, 64), generator=gen).float()
        x[:, 0], x[0] = levels, levels  # max |row| = levels: scale 1, so the answer is the integer products
        try:
            got = w8a8_linear(x, w8a8_pack(w, library), torch.ones(16), library)
        except (RuntimeError, AttributeError):
            continue
        if torch.equal(got.double(), x.double() @ w.double().T):  # below 2^24: exact in float32
            return library
    return None


def addmv(x: Tensor, weight: Tensor) -> Tensor:
    """One token: ATen's GEMV (beta=0 ignores the bias term; decoding.cpu_inductor keeps it an ATen call); several
    tokens: F.linear."""
    if x.shape[:-1].numel() == 1:
        return torch.addmv(x.new_zeros(()), weight, x.reshape(-1), beta=0).view(*x.shape[:-1], -1)
    return F.linear(x, weight)


def materialize(x: Tensor) -> Tensor:
    """x itself, which a compiled graph then stores once before a generated matmul reads it. Otherwise inductor
    inlines x's producer (the RMSNorm before the layer) into the matmul's loop and recomputes it for every output
    row, several loads and conversions per weight. as_strided is an identity whose lowering stores its input."""
    return x.as_strided(x.shape, x.stride())


SUM_CHUNK = 4096  # inductor sums more than this many float32 values per row in a cascade: 1.5x slower here


def row_dots(x: Tensor, weight: Tensor) -> Tensor:
    """(..., N) float32: each row of weight (N, K) times x (..., K), as products and sums for inductor to generate.
    x is stored once, in float32 (materialize), so that the loop converts only the weights: with bf16 x an AVX2
    Zen 3 decoded stories110M 1.23x and tinyllama 1.17x slower, and with int8 weights inductor stepped through 32
    at a time with a masked load (3x slower) instead of 16. A row longer than SUM_CHUNK is summed in c equal
    parts, then the parts (tinyllama's w2: 2 x 2816)."""
    K = weight.shape[-1]
    c = next(c for c in range(-(-K // SUM_CHUNK), K + 1) if K % c == 0)
    products = materialize(x.float())[..., None, :] * weight.float()
    return products.sum(-1) if c == 1 else products.view(*products.shape[:-1], c, K // c).sum(-1).sum(-1)


def inductor(x: Tensor, weight: Tensor) -> Tensor:
    """Inside torch.compile, one token: x @ W.T written as a product and a sum over the input features, float32
    accumulation, which inductor generates as a vectorized loop and fuses into the step (no library call per
    layer). Eager, or several tokens (the generated loop would read the weights once per token): F.linear."""
    if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
        return row_dots(x, weight).to(x.dtype)
    return F.linear(x, weight)


def inductor_int8(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """The int8 layers' inductor kernel (qlinear.Int8Linear, compiled, one token): x @ (W * scales).T as a product
    and a sum (row_dots)."""
    return (row_dots(x, weight) * scales.float()).to(x.dtype)


# name -> (prepare a plain (N, K) weight, or None: used as it is; multiply x by the weight): the float linears' kernels
KERNELS = {
    "addmv": (None, addmv),
    "onednn": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1), torch.ops.llama_fast.onednn_linear),
    "inductor": (None, inductor),  # not among tune.measure()'s candidates: tune times it in the compiled step
}


@functools.cache
def candidates(dtype) -> list:
    """The kernels auto chooses from for weights of `dtype` (oneDNN's float16 path, for one, needs AVX512-FP16
    or AVX-NE-CONVERT: a tiny weight is packed to find out)."""
    if dtype not in ONEDNN_DTYPES or not torch.backends.mkldnn.is_available():
        return ["addmv"]
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return ["addmv"]
    return ["addmv", "onednn"]


def forcible(dtype) -> list:
    """What --cpu_kernels may name for weights of `dtype`: the candidates, and inductor for 16-bit weights."""
    return candidates(dtype) + (["inductor"] if dtype in ONEDNN_DTYPES else [])


# ------------------------------------------------------------------------------------ several tokens: the GEMM
CHUNK_BYTES = 4 << 20  # float32 weight rows converted at a time


def float32_gemm(x: Tensor, rows, n: int, multiple: int = 16) -> Tensor:
    """x @ W.T computed in float32, in x's dtype, W (n, K) given as rows(i, j): its rows i:j in float32, converted
    CHUNK_BYTES at a time (i and j multiples of `multiple`, or j = n), so that each slice is still in cache when
    the GEMM reads it (one whole float32 copy per call took 2x as long at 5632 x 2048: fresh pages to fault in)."""
    xf, out = x.float(), x.new_empty(*x.shape[:-1], n)
    step = max(multiple, CHUNK_BYTES // (4 * x.shape[-1]) // multiple * multiple)
    for i in range(0, n, step):
        out[..., i:i + step] = F.linear(xf, rows(i, min(i + step, n)))  # rounded to x's dtype as it is stored
    return out
