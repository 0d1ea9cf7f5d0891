"""auto's kernel choice for compiled decode steps on CPU, by timing the compiled step itself.

With `--compile`, `--cpu_kernels inductor` writes each one-token matmul as a loop that inductor generates inside the
step (cpu_kernels.inductor, inductor_int8): no library call per layer. Whether that beats auto's eager choice
(oneDNN or addmv for bf16, ATen's int8 kernel) depends on the model and the machine: on a 2-core AMD EPYC with
AVX-512 it decoded stories110M 1.28x faster in bf16 and 1.37x in int8, but tinyllama 0.92x in bf16; on one with
AVX2 only, stories110M bf16 1.15x, but int8 4-10x slower (built by GCC; by clang, 1.36x faster). Timing the
kernels alone does not tell these apart. So auto times the step: a stand-in with the model's layer shapes, weight
formats and dtype but random weights (enough layers that they stream from memory, as the model's do) decodes a
few tokens compiled each way, and the faster way is used. The choice is cached per machine like cpu_kernels', and
per build of the loops (inductor_build): the C++ compiler inductor runs and the OpenMP runtime the loops run on
change their speed as much as the CPU does.

    model.use_cpu_kernels(step_kernel(model, "auto", compiled=True))   # "auto" or "inductor"
"""
import dataclasses
import functools
import glob
import os
import re
import statistics
import sys
import types
from pathlib import Path

import torch

from cpu_kernels import ONEDNN_DTYPES, cached, machine_key
from decoding import Steps, compile_static, decode_one_token, generate
from model import Linear, Transformer
from qlinear import Int4Experts, Int4Linear, Int8Experts, Int8Linear, pack_for_device, swap_in_quantized
from sampling import SamplingConfig

# In the cached key: raise it when cpu_kernels' loops change, so that a choice timed with the old loops is timed
# again (2: the 16-bit loop reads x in float32, 1.2x faster on an AVX2 Zen 3, where eager had been as fast)
LOOP_VERSION = 2
STAND_IN_BYTES = 512e6  # weights of the stand-in, at least (or the whole model): more than a CPU's caches hold
STEP_TOKENS, ROUNDS = 16, 5  # tokens decoded per timing, timings per way (alternating; the median counts)


def step_kernel(model: Transformer, force: str = "auto", compiled: bool = False) -> str:
    """What to pass to model.use_cpu_kernels: `force`, unless it is auto for a CPU model whose one-token steps
    will be compiled and inductor's loops could apply (16-bit float or int8 linears): then "auto" or "inductor",
    whichever decoded the stand-in faster. Call it on the model as loaded, before use_cpu_kernels."""
    on_cpu = model.output.weight.device.type == "cpu"
    if compiled and on_cpu and (warning := openmp_warning()):
        say_once(warning)
    if force != "auto" or not compiled or not on_cpu or not inductor_applies(model):
        return force
    formats = sorted({(type(m).__name__, str(m.weight.dtype).removeprefix("torch."), getattr(m, "groupsize", 0))
                      for m in model.modules() if isinstance(m, (Linear, Int8Linear, Int4Linear))})
    step = f"compiled one-token step, loops v{LOOP_VERSION}"
    key = f"{machine_key()} | {step} built by {inductor_build()} | {formats} | {dataclasses.asdict(model.config)}"
    return cached(key, lambda: step_rates(model))


def cpu_kernel_metrics(model: Transformer, compiled: bool) -> dict:
    """What --metrics_json reports of the CPU kernels a model runs (None for each off CPU): the float linears'
    matmul, the float32-GEMM threshold and, with compiled steps, who builds their loops."""
    on_cpu = model.output.weight.device.type == "cpu"
    return {"cpu_kernel": model.cpu_kernel if on_cpu else None, "cpu_gemm_from": model.cpu_gemm_from,
            "inductor_build": inductor_build() if on_cpu and compiled else None}


def inductor_build() -> str:
    """Who builds and runs the generated loops: inductor's C++ compiler (the CXX environment variable or
    torch._inductor.config.cpp.cxx; g++ unless set) and whether LLVM's OpenMP runtime is preloaded. On an AVX2-only
    Zen 3, GCC 12 compiles ATen's integer vector loads through a stack buffer (the int8 loop: 1.2 G weights/s)
    where clang loads them directly (16.2, ATen's int8 kernel 10.6); but clang's loops run on LLVM's OpenMP
    runtime, which then spins beside torch's GNU one for the same cores unless it is the only one (preloaded)."""
    return f"{inductor_cxx()}, {'LLVM OpenMP preloaded' if llvm_openmp_preloaded() else 'GNU OpenMP'}"


def inductor_cxx() -> str:
    from torch._inductor import config
    return Path(str(config.cpp.cxx[-1])).name


def llvm_openmp_preloaded() -> bool:
    """LLVM's (or Intel's) OpenMP runtime in LD_PRELOAD: it then serves torch's GNU OpenMP calls as well."""
    preloaded = re.split(r"[: ]", os.environ.get("LD_PRELOAD", ""))
    return any(Path(p).name.startswith(("libomp", "libiomp5")) for p in preloaded)


def openmp_warning() -> str | None:
    """A one-line warning where clang builds the compiled steps (CXX=clang++) without LLVM's OpenMP runtime
    preloaded: two runtimes then take turns on the cores (tinyllama int8 decoded 4.5 tokens/s instead of 12.5)."""
    if "clang" not in inductor_cxx() or llvm_openmp_preloaded():
        return None
    libomp = next(iter(sorted(glob.glob("/usr/lib/llvm-*/lib/libomp.so.5"))), "<path of libomp.so.5>")
    return ("warning: inductor builds with clang but LLVM's OpenMP runtime is not preloaded, so two OpenMP runtimes "
            f"compete for the cores: run with LD_PRELOAD={libomp} (README: How it is fast)")


@functools.cache
def say_once(message: str):  # a draft and its target are loaded alike: one warning
    print(message, file=sys.stderr)


def inductor_applies(model: Transformer) -> bool:
    return any(isinstance(m, Int8Linear) or isinstance(m, Linear) and m.weight.dtype in ONEDNN_DTYPES
               for m in model.modules())


@torch.no_grad()
def step_rates(model: Transformer) -> dict:
    """Decode tokens/s of a compiled stand-in of `model` with each of auto's and inductor's kernels: the median of
    ROUNDS alternating timings, or of fewer once one way is more than twice as fast (no need to know how much)."""
    stand_ins = {kernel: stand_in(model) for kernel in ("auto", "inductor")}
    steps = {kernel: private_steps() for kernel in stand_ins}
    for kernel, m in stand_ins.items():
        m.use_cpu_kernels(kernel)
        decode(m, steps[kernel], 2)  # compiles
    times = {kernel: [] for kernel in stand_ins}
    for _ in range(ROUNDS):
        for kernel, m in stand_ins.items():
            times[kernel].append(decode(m, steps[kernel], STEP_TOKENS))
        if max(map(min, times.values())) > 2 * min(map(min, times.values())):
            break
    return {kernel: 1 / statistics.median(t) for kernel, t in times.items()}


def private_steps() -> Steps:
    """The compiled decode step on a copy of decode_one_token's code: dynamo caches graphs per code object, and
    stops recompiling one after 8 (then fullgraph fails), so the stand-ins' graphs must not count toward the
    model's own; they go with the copy once timed."""
    code = decode_one_token.__code__.replace()  # a new code object with the same bytecode
    return Steps(decode=compile_static(types.FunctionType(code, decode_one_token.__globals__), "cpu"))


def decode(model: Transformer, steps, tokens: int) -> float:
    """Seconds per decoded token, greedy, batch 1 (one cache length, so that every call runs the same graph)."""
    result = generate(model, [[1] * 4], tokens + 1, SamplingConfig(temperature=0),
                      cache_len=min(64, model.config.max_seq_len), steps=steps)
    return result.decode_seconds / result.decode_tokens


def stand_in(model: Transformer) -> Transformer:
    """A model with `model`'s shapes, weight formats and dtypes, random weights, and as many of its layers as
    make STAND_IN_BYTES (all of them for a small model), packed for the CPU as loading packs them."""
    layer_bytes = sum(t.nbytes for t in model.layers[0].state_dict().values())
    n_layer = min(model.config.n_layers, max(1, -(-int(STAND_IN_BYTES) // max(1, layer_bytes))))
    kept = {name for name, _ in model.named_modules()
            if not name.startswith("layers.") or int(name.split(".")[1]) < n_layer}
    quantized = {name: "int8" if isinstance(m, (Int8Linear, Int8Experts)) else "int4" for name, m in
                 model.named_modules() if name in kept and isinstance(m, (Int8Linear, Int8Experts, Int4Linear,
                                                                          Int4Experts))}
    groupsize = next((m.groupsize for m in model.modules() if isinstance(m, (Int4Linear, Int4Experts))), 0)
    with torch.device("meta"):
        m = Transformer(dataclasses.replace(model.config, n_layers=n_layer))
    swap_in_quantized(m, quantized, groupsize)
    m = randomize(m.to_empty(device="cpu").to(model.tok_embeddings.weight.dtype))
    return pack_for_device(m).eval()


@torch.no_grad()
def randomize(model: Transformer) -> Transformer:
    """Random weights in place, for speed measurements: norms 1, other floats N(0, 0.02), integer (quantized)
    tensors uniform over their type's range."""
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif t.is_floating_point():
            t.normal_(0.0, 0.02)
        else:
            t.random_(torch.iinfo(t.dtype).min, torch.iinfo(t.dtype).max)
    return model
