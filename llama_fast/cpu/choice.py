"""Which CPU kernels a loaded model's layers use, and the module swap that gives them those kernels (as quantization
swaps nn.Linear for Int8Linear).

    choice = choose_kernels(model, "auto", compiled=True)   # CpuKernels, from the CPU's features: nothing is timed
    use_cpu_kernels(model, choice)                          # CpuLinear and CpuKVCache in; int8 layers' kernel set

--cpu_kernels auto (the default) is a rule (default_kernels) written from what was measured, end to end, on the CPU
kinds we have had (BENCHMARKS.md): oneDNN for 16-bit weights on AVX-512 without AMX, inductor's generated loop in
compiled steps where the layers are small or the CPU has no AVX-512, float32 GEMMs for several tokens where the CPU
has no 16-bit GEMM instructions. --cpu_kernels tune measures instead, on this machine (tune.py), and caches what it
found; a kernel's name forces it. --cpu_gemm native / float32 forces the several-token half.
"""
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from llama_fast.cpu.kernels import ONEDNN_DTYPES, candidates, forcible, w8a8_library
from llama_fast.cpu.layers import CpuKVCache, CpuLinear
from llama_fast.cpu.toolchain import inductor_build
from llama_fast.quant.qlinear import Int8Linear, swap_module
from model import Transformer

# A compiled step runs inductor's loop instead of a library call per layer where the layers' linears are on average
# smaller than this: stories110M's (3.5 MB in bf16) decoded 1.28x faster with the loop on an AVX-512 EPYC, where
# tinyllama's (22 MB) decoded 0.92x; without AVX-512 (an AVX2 Zen 3) the loop won or tied for both.
LOOP_MAX_BYTES = 8 << 20
# Without AVX-512 BF16 or AMX, 16-bit GEMMs of this many tokens or more run in float32 (an AVX2 Zen 3 timed the
# crossover at 16 tokens and at 64, with 8 a tie: BENCHMARKS.md history, seventh part)
FLOAT32_FROM = 16


@dataclass(frozen=True)
class CpuKernels:
    """The kernels of a model's layers on CPU."""
    linear: str = "addmv"  # the float linears' one-token matmul: a name in kernels.KERNELS
    int8: str = "int8pack"  # the int8 layers': int8pack (ATen's weight-only kernel), inductor or w8a8
    float32_from: int | None = None  # several tokens: from this many, a 16-bit model's matmuls run in float32
    several: str | None = None  # the float linears' matmul of several tokens, where not linear's own (several_for)


@functools.cache
def cpu_flags(cpuinfo: str | None = None) -> frozenset:
    """The CPU's feature flags (/proc/cpuinfo's first processor; cpuinfo: that file's text, for tests)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return frozenset()
    first = cpuinfo.split("\n\n")[0]
    line = next((line for line in first.splitlines() if line.startswith("flags")), "flags :")
    return frozenset(line.split(":", 1)[1].split())


def has_16bit_gemm(flags: frozenset | None = None) -> bool:
    """The CPU has instructions for 16-bit GEMMs (AVX-512 BF16 or AMX); without them ATen's bf16 GEMM ran ~8x slower
    than float32's (an AVX2 Zen 3: 20 against 150 GFLOP/s)."""
    return bool((cpu_flags() if flags is None else flags) & {"avx512_bf16", "amx_bf16"})


def float_linears(model: Transformer) -> list:
    """The plain float linears on CPU that a kernel can take over (an output tied to the embedding keeps addmv)."""
    return [m for m in model.modules() if type(m) in (nn.Linear, CpuLinear) and m.weight.device.type == "cpu"
            and m.weight is not model.tok_embeddings.weight]


def int8_layers(model: Transformer) -> list:
    return [m for m in model.modules() if isinstance(m, Int8Linear) and m.weight.device.type == "cpu"]


def default_kernels(model: Transformer, compiled: bool, flags: frozenset | None = None) -> CpuKernels:
    """--cpu_kernels auto: the kernels for this CPU's features (flags: cpu_flags()) and the model's layer sizes."""
    flags = cpu_flags() if flags is None else flags
    avx512, amx = "avx512f" in flags, "amx_bf16" in flags
    linears = float_linears(model)
    dtype = linears[0].weight.dtype if linears else None
    sixteen_bit = dtype in ONEDNN_DTYPES
    linear = "onednn" if sixteen_bit and avx512 and not amx and "onednn" in candidates(dtype) else "addmv"
    mean_bytes = sum(m.weight.nbytes for m in linears) / max(1, len(linears))
    eager = linear
    if compiled and sixteen_bit and (not avx512 or mean_bytes <= LOOP_MAX_BYTES):
        linear = "inductor"
    int8 = "inductor" if compiled and avx512 and int8_layers(model) else "int8pack"
    sixteen_bit_model = model.tok_embeddings.weight.dtype in ONEDNN_DTYPES
    float32_from = FLOAT32_FROM if sixteen_bit_model and not has_16bit_gemm(flags) else None
    return CpuKernels(linear, int8, float32_from, several_for(linear, eager))


def several_for(linear: str, eager: str) -> str | None:
    """The several-token matmul of layers whose one-token matmul is `linear`, where `eager` is this CPU's eager
    kernel: oneDNN beside inductor's loop where oneDNN is the eager kernel, on a second, prepacked copy of the
    weights. The loop is for one token; several went to F.linear, which packs the weight again at every call:
    stories110M's layers at 4-16 tokens took 1.4-1.5x as long as on the prepacked copy (2-core Zen 5), and the
    serving engine's steps of 4 and 16 rows 1.2-1.5x and 1.07x. The copy doubles the layers' memory, which the loop
    is only chosen for where they are small (LOOP_MAX_BYTES)."""
    return "onednn" if linear == "inductor" and eager == "onednn" else None


def choose_kernels(model: Transformer, kernels: str = "auto", gemm: str | int = "auto", compiled: bool = False,
                   auto: CpuKernels | None = None) -> CpuKernels:
    """What --cpu_kernels and --cpu_gemm ask for, for this model: kernels "auto" or a kernel's name; gemm "auto",
    "native", "float32" or a number of tokens (rank 0's answer, under tensor parallelism). compiled: its one-token
    steps will be compiled. auto: what "auto" stands for (default: default_kernels; tune.tuned_kernels passes what it
    measured). A kernel this model or CPU cannot take is a ValueError."""
    choice = auto or default_kernels(model, compiled)
    if kernels != "auto":
        choice = forced(model, kernels, choice)
    return dataclasses.replace(choice, float32_from=gemm_threshold(model, gemm, choice.float32_from))


def forced(model: Transformer, kernel: str, auto: CpuKernels) -> CpuKernels:
    """`kernel` where the model's layers can take it: w8a8 and inductor for int8 layers, inductor, addmv and onednn
    for float ones (16-bit, for oneDNN and inductor); auto's kernel for the rest."""
    int8, linears = int8_layers(model), float_linears(model)
    dtype = linears[0].weight.dtype if linears else model.tok_embeddings.weight.dtype
    if kernel == "w8a8":
        if not int8:
            raise ValueError("--cpu_kernels w8a8 is for int8 checkpoints (quantize.py --mode int8): this one has no "
                             "int8 layers")
        if not w8a8_library():
            raise ValueError("--cpu_kernels w8a8: not available for int8 layers on this CPU (neither oneDNN's nor "
                             "FBGEMM's integer kernel is exact here)")
        return CpuKernels(auto.linear, "w8a8", auto.float32_from)
    if kernel == "inductor" and int8 and kernel not in forcible(dtype):
        return CpuKernels(auto.linear, "inductor", auto.float32_from, auto.several)
    if kernel not in forcible(dtype):
        raise ValueError(f"--cpu_kernels {kernel}: not available for {str(dtype).removeprefix('torch.')} weights "
                         f"here; choose from auto, tune, {', '.join(forcible(dtype))}")
    eager = auto.several or auto.linear  # the several-token kernel is auto's (the loop is for one token)
    return CpuKernels(kernel, "inductor" if kernel == "inductor" else "int8pack", auto.float32_from,
                      several_for(kernel, eager))


def gemm_threshold(model: Transformer, gemm: str | int, auto: int | None) -> int | None:
    if model.tok_embeddings.weight.dtype not in ONEDNN_DTYPES or gemm in ("native", None):
        return None
    if gemm == "auto":
        return auto
    return 2 if gemm == "float32" else int(gemm)


@torch.no_grad()
def use_cpu_kernels(model: Transformer, choice: CpuKernels) -> Transformer:
    """Give a loaded model's CPU layers the kernels of `choice`: float linears become CpuLinear (the weights
    prepacked where the kernel wants it), int8 layers switch kernel, every layer that runs several-token GEMMs learns
    float32_from, and the static KV cache becomes CpuKVCache. Off CPU nothing changes. Returns the model."""
    if model.tok_embeddings.weight.device.type != "cpu":
        model.cpu_kernels = None
        return model
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and m.weight.device.type == "cpu":
            tied = m.weight is model.tok_embeddings.weight
            kernel = "addmv" if tied or m.weight.dtype not in ONEDNN_DTYPES else choice.linear
            # a prepacked (oneDNN) weight cannot be sliced into float32 rows: such layers keep their 16-bit GEMM
            swap_module(model, name, CpuLinear(m, kernel, None if kernel == "onednn" else choice.float32_from,
                                               choice.several if kernel == choice.linear else None))
        elif isinstance(m, Int8Linear):
            m.use_kernel(choice.int8)
    for m in model.modules():
        if hasattr(m, "float32_from") and not isinstance(m, CpuLinear):  # the quantized layers' dense GEMM
            m.float32_from = choice.float32_from
    model.kv_cache_class = CpuKVCache
    model.cpu_kernels = choice
    return model


def metrics(model: Transformer, compiled: bool) -> dict:
    """What --metrics_json reports of the CPU kernels a model runs (None for each off CPU): the one-token kernel (of
    the int8 layers where they have one of their own), the float linears' several-token kernel where it is another,
    the float32-GEMM threshold and, with compiled steps, who builds inductor's loops."""
    choice = getattr(model, "cpu_kernels", None)
    if choice is None:
        return {"cpu_kernel": None, "cpu_kernel_several": None, "float32_from": None, "inductor_build": None}
    int8_own = choice.int8 != "int8pack" and int8_layers(model)
    return {"cpu_kernel": choice.int8 if int8_own else choice.linear,
            "cpu_kernel_several": None if int8_own else choice.several, "float32_from": choice.float32_from,
            "inductor_build": inductor_build() if compiled else None}
