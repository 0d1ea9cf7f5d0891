"""The serving engine in process, on scripts/bench_serve.py's workload (random token-id prompts, greedy, no stop at
EOS), with N requests kept in flight (a closed loop: a new one starts as one ends): output tokens/s, time to first
token and inter-token latency (each token timed where the engine hands it out), and where the steps' time went.
Without HTTP and a client on the same cores, what the scheduler does can be told from what the machine does.

    python scripts/bench_engine.py --checkpoint_path checkpoints/demo-stories110M/model.pth --compile \\
        --num_requests 24 --concurrency 4 --prompt_tokens 32 768 --output_tokens 64 256 [--itl_target_ms inf]

Steps are reported in three kinds: decoding rows alone, decoding rows beside prompt chunks (mixed), and prompt
chunks alone.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import PRECISIONS, check_at_least, cli_main  # noqa: E402

from llama_fast.checkpoint import check_is_file, load_model, read_config  # noqa: E402
from llama_fast.serving.engine import Engine, EngineConfig  # noqa: E402
from llama_fast.serving.request import Request  # noqa: E402
from scripts.bench_serve import check_min_max, percentiles, workload  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", type=Path, required=True)
    p.add_argument("--num_requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (also the engine's batch size)")
    p.add_argument("--prompt_tokens", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--output_tokens", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"))
    p.add_argument("--itl_target_ms", type=float, default=EngineConfig.itl_target_ms,
                   help="as serve.py's (0: the default target; inf: the token budget alone)")
    p.add_argument("--max_num_batched_tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    p.add_argument("--kv_cache_dtype", choices=["auto", "int8"], default="auto")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bfloat16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def random_workload(args, vocab_size: int) -> list[dict]:
    """bench_serve.py's workload of random token-id prompts (ids 0-2, unk, BOS and EOS, left out): with the same
    --seed, the same requests as bench_serve.py --vocab 3 <vocab_size - 1> sends."""
    return workload(argparse.Namespace(**vars(args), prompt_file=None, text_prompts=False, vocab=(3, vocab_size - 1)))


def run_closed_loop(engine: Engine, jobs: list, concurrency: int) -> tuple[float, dict, dict, list]:
    """Run jobs with `concurrency` in flight. Returns the seconds taken, each request's arrival and token times,
    and each forward pass as (seconds, decoding rows, prompt tokens)."""
    steps, arrival, times = [], {}, {}
    forward = engine.runner.forward

    def timed_forward(rows):
        start = time.perf_counter()
        logits = forward(rows)
        steps.append((time.perf_counter() - start, sum(n == 1 for _, n in rows), sum(n for _, n in rows if n > 1)))
        return logits
    engine.runner.forward = timed_forward
    pending, live = list(jobs), []
    start = time.perf_counter()
    try:
        while pending or live:
            while pending and len(live) < concurrency:
                job = pending.pop(0)
                r = Request(job["prompt"], job["max_tokens"], on_output=lambda r, text, tokens: times[r.id].append(
                    time.perf_counter()) if tokens else None)
                arrival[r.id], times[r.id] = time.perf_counter(), []
                engine.add(r)
                live.append(r)
            engine.step()
            live = [r for r in live if r.finish_reason is None]
    finally:
        engine.runner.forward = forward
    return time.perf_counter() - start, arrival, times, steps


def report(seconds: float, arrival: dict, times: dict, steps: list) -> str:
    tokens = sum(map(len, times.values()))
    gaps = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
    ttft = [ts[0] - arrival[i] for i, ts in times.items() if ts]
    itl, ttft = percentiles(gaps), percentiles(ttft)
    p50, p99 = 1000 * itl["p50"], 1000 * itl["p99"]
    lines = [f"{tokens / seconds:.1f} output tok/s ({tokens} tokens in {seconds:.1f} s; forward passes "
             f"{sum(s for s, _, _ in steps):.1f} s)",
             f"TTFT p50 / p99 {ttft['p50']:.2f} / {ttft['p99']:.2f} s",
             f"ITL p50 / p99 {p50:.1f} / {p99:.1f} ms ({p99 / p50:.2f}x); "
             f"{sum(g > 2 * p50 / 1000 for g in gaps) / len(gaps):.1%} of gaps above twice the median"]
    kinds = {"decoding rows alone": [s for s in steps if not s[2]],
             "decoding rows beside prompt chunks": [s for s in steps if s[1] and s[2]],
             "prompt chunks alone": [s for s in steps if not s[1]]}
    for name, kind in kinds.items():
        if kind:
            lines.append(f"{name}: {len(kind)} steps, {sum(s for s, _, _ in kind):.1f} s, median "
                         f"{1000 * statistics.median(s for s, _, _ in kind):.1f} ms, "
                         f"{statistics.mean(d for _, d, _ in kind):.1f} decoding rows and "
                         f"{statistics.mean(p for _, _, p in kind):.0f} prompt tokens on average")
    return "\n".join(lines)


def run(args) -> int:
    check_at_least(args, num_requests=1, concurrency=1, itl_target_ms=0.0)
    check_min_max(args, "prompt_tokens", "output_tokens")
    check_is_file(args.checkpoint_path, "checkpoint")
    config = read_config(args.checkpoint_path)
    if args.prompt_tokens[1] + args.output_tokens[1] > config.max_seq_len:
        raise ValueError(f"the longest prompt and output ({args.prompt_tokens[1]} + {args.output_tokens[1]} tokens) "
                         f"exceed the model's context of {config.max_seq_len}")
    engine_config = EngineConfig(max_batch_size=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens,
                                 itl_target_ms=args.itl_target_ms, kv_cache_dtype=args.kv_cache_dtype,
                                 compile=args.compile)  # (its checks, before the model loads)
    model = load_model(args.checkpoint_path, "cpu", PRECISIONS[args.precision], compiled=args.compile)
    engine = Engine(model, None, engine_config)
    engine.warm_up()
    print(report(*run_closed_loop(engine, random_workload(args, config.vocab_size), args.concurrency)))
    return 0


def main(argv=None):
    cli_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
