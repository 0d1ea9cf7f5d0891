"""Decode attention (one new token) on the CPU, compiled: ATen's SDPA against model.attend_one, per layer.

    python scripts/bench_attention.py                               # the grid in BENCHMARKS.md
    python scripts/bench_attention.py --head_dim 64 --n_rep 1 --keys 144

Each configuration runs --layers layers of attention in one compiled graph (each layer its own KV cache, as in a
model) and reports microseconds per layer, median of --repeats. The query heads sharing a KV head (n_rep) are what
decides: SDPA pays a fixed cost per (row, head), so with one query row per head attend_one wins; model.Attention
uses attend_one exactly there. The heads per configuration: head_dim 64 has 16 query heads, 128 has 32 (Llama-2-7B).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import PRECISIONS, check_at_least, cli_main  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama_fast.cpu.layers import attend_one  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head_dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--n_rep", type=int, nargs="+", default=[1, 2, 4, 8], help="query heads per KV head")
    p.add_argument("--keys", type=int, nargs="+", default=[256, 1024, 2048], help="KV cache length")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bfloat16")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    return p


def sdpa(q, keys, values, mask):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None])


def ours(q, keys, values, mask):
    return attend_one(q, keys.transpose(1, 2), values.transpose(1, 2), mask)


def time_per_layer(attention, q, caches, mask, repeats: int) -> float:
    """Seconds per layer of `attention` over every cache in one compiled graph."""
    def layers(q, caches, mask):
        x = q
        for keys, values in caches:
            x = attention(x, keys, values, mask) + q
        return x
    compiled = torch.compile(layers, fullgraph=True)
    compiled(q, caches, mask)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            compiled(q, caches, mask)
        times.append((time.perf_counter() - t0) / 10 / len(caches))
    return statistics.median(times)


@torch.inference_mode()
def run(args) -> int:
    for name in ("head_dim", "n_rep", "keys"):
        if min(getattr(args, name)) < 1:
            raise ValueError(f"--{name} must be >= 1, got {min(getattr(args, name))}")
    check_at_least(args, layers=1, repeats=1)
    dtype = PRECISIONS[args.precision]
    torch._dynamo.config.recompile_limit = 4 * len(args.head_dim) * len(args.n_rep) * len(args.keys)
    print(f"{torch.get_num_threads()} threads, {args.precision}, torch {torch.__version__}\n")
    print("| KV heads x n_rep | head_dim | keys | SDPA us/layer | attend_one us/layer | SDPA / attend_one |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for head_dim in args.head_dim:
        n_heads = 16 if head_dim <= 64 else 32
        for n_rep in args.n_rep:
            n_kv = max(1, n_heads // n_rep)
            for keys in args.keys:
                q = torch.randn(1, n_kv, n_rep, head_dim, dtype=dtype)
                caches = [(torch.randn(1, n_kv, keys, head_dim, dtype=dtype),
                           torch.randn(1, n_kv, keys, head_dim, dtype=dtype)) for _ in range(args.layers)]
                mask = (torch.arange(keys) < keys - keys // 8)[None]  # the cache's tail not yet written
                t_sdpa, t_ours = (time_per_layer(f, q, caches, mask, args.repeats) for f in (sdpa, ours))
                print(f"| {n_kv} x {n_rep} | {head_dim} | {keys} | {t_sdpa * 1e6:.0f} | {t_ours * 1e6:.0f} | "
                      f"{t_sdpa / t_ours:.2f} |", flush=True)
    return 0


def main(argv=None):
    cli_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
