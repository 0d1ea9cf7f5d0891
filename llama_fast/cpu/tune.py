"""--cpu_kernels tune: the CPU kernels measured on this machine, cached per machine in
$XDG_CACHE_HOME/llama-fast/cpu_kernels.json (the key names the CPU, its vector extensions, the threads and the torch
version: machine_key), so that a later run reads the answer instead of measuring again.

    choice = tuned_kernels(model, compiled=True)   # a choice.CpuKernels: what --cpu_kernels tune uses
                                                   # (checkpoint.cpu_kernels_for)

Three measurements, each only where it has something to choose between:
- the float linears' one-token kernel (addmv or oneDNN on a prepacked weight), timed alone on the model's layer
  shapes with the weights streamed from memory, as a decode step reads them (measure);
- for compiled steps, auto's eager kernels against inductor's generated loops, timed in the compiled step itself
  (step_rates): timing the kernels alone does not predict the step. A stand-in with the model's layer shapes,
  weight formats and dtype but random weights (enough layers that they stream from memory, as the model's do)
  decodes a few tokens compiled each way, and the faster is kept. The answer is keyed also by who builds the loops
  (inductor_build): the C++ compiler and the OpenMP runtime change their speed as much as the CPU does;
- for a 16-bit model, from how many tokens its GEMMs are faster in float32 (measure_gemm).
Tuning a model takes seconds (stories110M) to minutes (tinyllama, compiled), once per machine and model shape.
"""
import dataclasses
import json
import os
import platform
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from decoding import Steps, compile_static, decode_one_token, generate
from llama_fast.cpu.choice import CpuKernels, float_linears, int8_layers, several_for, use_cpu_kernels
from llama_fast.cpu.kernels import KERNELS, ONEDNN_DTYPES, candidates, float32_gemm
from llama_fast.cpu.toolchain import inductor_build
from llama_fast.quant.qlinear import (Int4Experts, Int4Linear, Int8Experts, Int8Linear, pack_for_device,
                                      swap_in_quantized)
from model import Transformer
from sampling import SamplingConfig

# In the cached key: raise it when the kernels' loops change, so that a choice timed with the old loops is timed
# again (2: the 16-bit loop reads x in float32, 1.2x faster on an AVX2 Zen 3, where eager had been as fast)
LOOP_VERSION = 2
STAND_IN_BYTES = 512e6  # weights of the stand-in, at least (or the whole model): more than a CPU's caches hold
STEP_TOKENS, ROUNDS = 16, 5  # tokens decoded per timing, timings per way (alternating; the median counts)
GEMM_TOKENS = (8, 16, 64)  # float32_gemm is timed against the 16-bit GEMM at these token counts


def tuned_kernels(model: Transformer, compiled: bool) -> CpuKernels:
    """The kernels measured fastest here for this model (its one-token steps compiled or not), each measurement
    read from the cache when it was made before."""
    linears = float_linears(model)
    linear = tuned_linear([tuple(m.weight.shape) for m in linears], linears[0].weight.dtype) if linears else "addmv"
    eager = CpuKernels(linear, "int8pack", tuned_float32_from(model.tok_embeddings.weight.dtype))
    if not compiled or not loops_apply(model):
        return eager
    loop = "inductor" if linears and linears[0].weight.dtype in ONEDNN_DTYPES else linear
    loops = CpuKernels(loop, "inductor" if int8_layers(model) else "int8pack", eager.float32_from,
                       several_for(loop, linear))
    formats = sorted({(type(m).__name__, str(m.weight.dtype).removeprefix("torch."), getattr(m, "groupsize", 0))
                      for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear, Int4Linear))})
    step = f"compiled one-token step, loops v{LOOP_VERSION}"
    key = f"{machine_key()} | {step} built by {inductor_build()} | {formats} | {dataclasses.asdict(model.config)}"
    ways = {"eager": eager, "loops": loops}
    return ways[cached(key, lambda: step_rates(model, ways))]


def loops_apply(model: Transformer) -> bool:
    """inductor's loops can take some of the model's linears: 16-bit float ones or int8 ones."""
    return bool(int8_layers(model)) or any(m.weight.dtype in ONEDNN_DTYPES for m in float_linears(model))


def tuned_linear(shapes: list, dtype) -> str:
    """The fastest one-token kernel here for float weights of these shapes and dtype (measure), cached."""
    if len(candidates(dtype)) == 1:
        return candidates(dtype)[0]
    key = f"{machine_key()} | {str(dtype).removeprefix('torch.')} | {sorted(set(map(tuple, shapes)))}"
    return cached(key, lambda: measure(shapes, dtype))


def tuned_float32_from(dtype) -> int | None:
    """From how many tokens a 16-bit model's matmuls are faster in float32 here (timed at each of GEMM_TOKENS,
    cached), or None: never (other weights, or a CPU whose 16-bit GEMM is faster, e.g. one with AVX-512 BF16)."""
    if dtype not in ONEDNN_DTYPES:
        return None
    for tokens in GEMM_TOKENS:
        key = f"{machine_key()} | {str(dtype).removeprefix('torch.')} | GEMM of {tokens} tokens"
        if cached(key, lambda: measure_gemm(dtype, tokens)) == "float32":
            return tokens
    return None


KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def machine_key(cpuinfo: str | None = None) -> str:
    """What a measurement holds for: the CPU (its model name, family and model numbers, and the vector extensions
    the kernels use: one model name, "AMD EPYC", is both an AVX2 Zen 3 and an AVX-512 Zen 5 on our VMs), the
    threads used and the torch version. cpuinfo: /proc/cpuinfo's text (read if not given)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        info = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        flags = set(info.get("flags", "").split())
        cpu = (f"{info.get('model name', cpu)} (family {info.get('cpu family', '?')} model {info.get('model', '?')}"
               f"; {' '.join(f for f in KERNEL_FLAGS if f in flags) or 'no AVX2'})")
    except OSError:
        pass
    return f"{cpu} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-fast" / "cpu_kernels.json"


def median_seconds(run, repeats: int) -> float:
    """The median time of `repeats` calls of run(), after one untimed call (oneDNN picks its kernel on the first)."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(shapes: list, dtype, stream_bytes: float = 256e6, repeats: int = 3) -> dict:
    """G weights/s of each candidate's one-token matmul over copies of the (N, K) shapes cycled through
    stream_bytes of weights (so they come from memory, as a decode step's do): {kernel: rate}."""
    per_pass = sum(n * k for n, k in shapes) * torch.finfo(dtype).bits // 8
    copies = max(1, round(stream_bytes / per_pass))
    weights = [torch.randn(n, k, dtype=dtype) * 0.02 for _ in range(copies) for n, k in shapes]
    xs = {k: torch.randn(1, 1, k, dtype=dtype) for _, k in shapes}
    rates = {}
    for name in candidates(dtype):
        prepare, mm = KERNELS[name]
        prepared = [(prepare(w) if prepare else w, xs[w.shape[1]]) for w in weights]
        seconds = median_seconds(lambda: [mm(x, w) for w, x in prepared], repeats)
        rates[name] = sum(w.numel() for w in weights) / seconds / 1e9
    return rates


def cached(key: str, rates, cache: Path | None = None) -> str:
    """The fastest kernel under `key` in this machine's table of measurements (the key names the machine), else
    the fastest of rates() ({kernel: rate, higher is faster}), which is then added to the table."""
    cache = cache or cache_path()
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        measured = rates()
        table[key] = {"kernel": max(measured, key=measured.get), "rates": measured}
        try:  # a read-only home only costs the measurement next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=2) + "\n")
            os.replace(tmp, cache)
        except OSError:
            pass
    return table[key]["kernel"]



@torch.no_grad()
def measure_gemm(dtype, tokens: int, shape=(4096, 2048), repeats: int = 3) -> dict:
    """Seconds⁻¹ of a (tokens, K) x (N, K) matmul in `dtype` ("native") and through float32_gemm ("float32")."""
    w, x = torch.randn(shape, dtype=dtype) * 0.02, torch.randn(tokens, shape[1], dtype=dtype)
    ways = {"native": lambda: F.linear(x, w), "float32": lambda: float32_gemm(x, lambda i, j: w[i:j].float(), len(w))}
    return {name: 1 / median_seconds(way, repeats) for name, way in ways.items()}


@torch.no_grad()
def step_rates(model: Transformer, ways: dict) -> dict:
    """Decode tokens/s of a compiled stand-in of `model` with each way's kernels ({name: CpuKernels}): the median of
    ROUNDS alternating timings, or of fewer once one way is more than twice as fast (no need to know how much)."""
    # one-token steps: a several-token kernel's copy of the weights would only take memory
    stand_ins = {name: use_cpu_kernels(stand_in(model), dataclasses.replace(kernels, several=None))
                 for name, kernels in ways.items()}
    steps = {name: private_steps() for name in stand_ins}
    for name, m in stand_ins.items():
        decode(m, steps[name], 2)  # compiles
    times = {name: [] for name in stand_ins}
    for _ in range(ROUNDS):
        for name, m in stand_ins.items():
            times[name].append(decode(m, steps[name], STEP_TOKENS))
        if max(map(min, times.values())) > 2 * min(map(min, times.values())):
            break
    return {name: 1 / statistics.median(t) for name, t in times.items()}


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
