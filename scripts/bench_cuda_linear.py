"""One-token linears on a CUDA GPU, eager and compiled with and without inductor's coordinate descent tuning (what
decoding.compile_static turns on): the rate at which each reads the weights, in GB/s of weight bytes.

    python scripts/bench_cuda_linear.py [--layers 8] [--out_features 22016] [--in_features 4096]

Llama-2-7B's fused gate/up projection by default, 8 layers in one call so that the call's launch cost is small
beside the reads. int8 is Int8Linear's generic path (a bf16 copy of the weights, then cuBLAS, unless inductor fuses
the conversion into a product-and-sum reduction); bf16 is F.linear.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decoding import CUDA_COMPILE_OPTIONS  # noqa: E402

OPTIONS = {"compiled": {**CUDA_COMPILE_OPTIONS, "coordinate_descent_tuning": False},
           "compiled + coordinate descent (compile_static's)": CUDA_COMPILE_OPTIONS}


def rate(fn, x, nbytes: int, calls: int = 20, repeats: int = 5) -> float:
    """Weight bytes read per second (GB/s): the median of `repeats` timings of `calls` calls, after 3 warm-ups."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return nbytes / statistics.median(times) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out_features", type=int, default=22016)
    p.add_argument("--in_features", type=int, default=4096)
    args = p.parse_args()
    if min(args.layers, args.out_features, args.in_features) < 1:
        sys.exit("error: --layers, --out_features and --in_features must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device is present")
    torch.manual_seed(0)
    L, N, K = args.layers, args.out_features, args.in_features
    codes = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda") for _ in range(L)]
    scales = [torch.rand(N, device="cuda", dtype=torch.bfloat16) / 100 for _ in range(L)]
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    cases = {"int8": (lambda x: sum(F.linear(x, w.to(x.dtype)) * s for w, s in zip(codes, scales)), L * N * K),
             "bf16": (lambda x: sum(F.linear(x, w) for w in weights), 2 * L * N * K)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {L} x ({N} x {K}) weights, one token")
    for name, (fn, nbytes) in cases.items():
        ref = fn(x).float()
        print(f"{name:5} eager: {rate(fn, x, nbytes):6.0f} GB/s", flush=True)
        for label, options in OPTIONS.items():
            torch._dynamo.reset()
            t0 = time.perf_counter()
            compiled = torch.compile(fn, fullgraph=True, options=options)
            err = ((compiled(x).float() - ref).abs().max() / ref.abs().max()).item()
            print(f"{name:5} {label}: {rate(compiled, x, nbytes):6.0f} GB/s (compile {time.perf_counter() - t0:.1f} s, "
                  f"max error {err:.1e} of the largest output)", flush=True)


if __name__ == "__main__":
    main()
