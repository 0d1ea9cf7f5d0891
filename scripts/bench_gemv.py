"""One-token matmul (GEMV) speed of the kernels a decode step runs on: bf16, int8 and int4 weights.

    python scripts/bench_gemv.py                 # tinyllama's w1|w3 shape, weights streamed from DRAM
    python scripts/bench_gemv.py --cached        # one matrix over and over: it stays in cache (compute ceiling)
    python scripts/bench_gemv.py --out_features 4096 --in_features 4096 --threads 1
    python scripts/bench_gemv.py --tokens 64      # a batch of 64 tokens (prefill): where dequantize + GEMM wins

Decode is a chain of GEMVs over weights read once per token, so its speed is set by how fast each kernel streams
weights from memory (`inductor`, the loop inductor generates, is timed inside one compiled graph of all the
copies, the way a compiled decode step runs it). By default the benchmark cycles through enough copies of the
matrix (0.9 GB of int8) that no cache holds them, which is what happens in a model bigger than the last-level
cache. Reported: G weights/s and
GB/s of weight bytes (median of --repeats passes), and this process's plain read bandwidth for comparison.
Each quantized format is shown with its kernel and with the alternatives of dequantizing its weights to bf16 and
running the dense matmul (what qlinear does from qlinear.GEMM_TOKENS tokens on), or to float32 a slice at a time
(cpu_kernels.float32_gemm: what every layer does on a CPU whose bf16 GEMM is slow, --cpu_gemm); int8 also with the other
kernels: inductor's generated loop (`--cpu_kernels inductor`, compiled as above) and w8a8 (`--cpu_kernels w8a8`:
activations quantized per token, oneDNN's or FBGEMM's integer kernel).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_fast.cpu.kernels import float32_gemm, forcible, w8a8_library  # noqa: E402
from llama_fast.cpu.layers import CpuLinear  # noqa: E402
from llama_fast.quant.qlinear import CPU_INT4_BLOCK, Int4Linear, Int8Linear, quantize_linear  # noqa: E402
from scripts.bench import measure_bandwidth  # noqa: E402
from llama_fast.cpu.toolchain import inductor_build  # noqa: E402


def median_seconds(layers, x, repeats):
    for layer in layers[:2]:  # warm-up
        layer(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for layer in layers:
            layer(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dense_matmul(layer, dtype):
    """The layer as a dense matmul: its weights dequantized to bf16 whole, or to float32 in float32_gemm's slices
    (whole blocks of the int4 CPU layout)."""
    if dtype == torch.bfloat16:
        return lambda x: F.linear(x, layer.dequantized(x.dtype))
    rows = getattr(layer, "dequantized", lambda dtype, i, j: layer.weight[i:j].to(dtype))
    return lambda x: float32_gemm(x, lambda i, j: rows(torch.float32, i, j), len(layer.weight), CPU_INT4_BLOCK or 16)


def check_args(args):
    if args.tokens < 1 or args.repeats < 1 or args.threads < 1:
        sys.exit("error: --tokens, --repeats and --threads must be at least 1")
    if not set(args.groupsizes) <= {32, 64, 128, 256}:
        sys.exit("error: --groupsizes must be among 32 64 128 256")
    if args.in_features % max(args.groupsizes) or args.out_features % 16:  # what the int4 CPU packer takes
        sys.exit(f"error: --in_features must be a multiple of {max(args.groupsizes)} (the largest group size) "
                 "and --out_features a multiple of 16")


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_features", type=int, default=11264)
    p.add_argument("--in_features", type=int, default=2048)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cached", action="store_true", help="reuse one matrix, so it stays in cache")
    p.add_argument("--stream_bytes", type=float, default=0.9e9, help="int8 bytes cycled through when not --cached")
    p.add_argument("--groupsizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=1, help="rows of the activation (1: a decode step)")
    args = p.parse_args()
    check_args(args)
    torch.set_num_threads(args.threads)
    N, K = args.out_features, args.in_features
    calls = max(2, round(args.stream_bytes / (N * K)))  # layers per pass: distinct copies, or one repeated
    where = "one matrix, cached" if args.cached else f"{calls} copies cycled, streamed from memory"
    print(f"{N} x {K} weights, {where}, {args.tokens} token(s), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, loops built by {inductor_build()}")
    x = torch.randn(args.tokens, K, dtype=torch.bfloat16)
    dense = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16).requires_grad_(False)

    def report(name, layer, kernel=None, dequantize=None):
        layers = [layer] * calls if args.cached else [layer] + [copy.deepcopy(layer) for _ in range(calls - 1)]
        if kernel and isinstance(layer, torch.nn.Linear):  # after the copies: a prepacked weight cannot be copied
            swapped = {id(m): CpuLinear(m, kernel) for m in layers}
            layers = [swapped[id(m)] for m in layers]
        elif kernel:
            for distinct in {id(m): m for m in layers}.values():
                distinct.use_kernel(kernel)
        if dequantize:
            layers = [dense_matmul(m, dequantize) for m in layers]
        if kernel == "inductor":  # its generated loop exists inside a compiled graph only: one of all the layers
            layers = [torch.compile(lambda x, ms=tuple(layers): [m(x) for m in ms], fullgraph=True)]
        t = median_seconds(layers, x, args.repeats)
        nbytes = sum(b.numel() * b.element_size() for b in layer.state_dict().values())
        print(f"{name:42s} {N * K * calls / t / 1e9:6.2f} G weights/s {nbytes * calls / t / 1e9:6.2f} GB/s", flush=True)

    for kernel in forcible(torch.bfloat16):  # what --cpu_kernels can name
        report(f"bf16 (CpuLinear: {kernel}{', compiled' if kernel == 'inductor' else ''})", copy.deepcopy(dense),
               kernel)
    report("bf16 (float32 GEMM, --cpu_gemm float32)", dense, dequantize=torch.float32)
    int8 = Int8Linear(K, N)
    int8.load_state_dict(quantize_linear(dense, "int8", 0))
    int8.to(torch.bfloat16).pack_for_device()  # scales in the activation dtype, as checkpoint.load_model leaves them
    report("int8 (int8pack_mm)", int8)
    report("int8 (dequantize to bf16 + F.linear)", int8, dequantize=torch.bfloat16)
    report("int8 (dequantize to float32 + GEMM)", int8, dequantize=torch.float32)
    report("int8 (inductor, compiled)", copy.deepcopy(int8), "inductor")
    if w8a8_library():  # last: it prepacks the layer
        report(f"int8 (w8a8 {w8a8_library()}, opt-in)", int8, "w8a8")
    for g in args.groupsizes:
        int4 = Int4Linear(K, N, g)
        int4.load_state_dict(quantize_linear(dense, "int4", g))
        int4.to(torch.bfloat16).pack_for_device()
        report(f"int4 g{g} (int4pack_mm)", int4)
        report(f"int4 g{g} (dequantize to bf16 + F.linear)", int4, dequantize=torch.bfloat16)
        report(f"int4 g{g} (dequantize to float32 + GEMM)", int4, dequantize=torch.float32)
    print(f"read bandwidth (float32 sum over 1 GiB): {measure_bandwidth('cpu', 1 << 30) / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
