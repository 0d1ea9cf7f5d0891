"""Decode speed of the serving engine with the KV pool in the model's dtype against int8 (--kv_cache_dtype int8), at
a long context: random weights of a preset's shape in bf16, --rows requests whose prompts fill the context but for
--new_tokens, compiled, the two pools alternating for --rounds rounds (each in a fresh Engine). Reports each run's
decode tokens/s (median step, every row decoding) and the per-round ratios.

    python scripts/bench_kv_cache.py --model tinyllama-1.1b --context 2048 --rows 4 --new_tokens 48 --rounds 4
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import check_at_least, cli_main  # noqa: E402
import torch  # noqa: E402

from llama_fast.cpu.choice import default_kernels, use_cpu_kernels  # noqa: E402
from llama_fast.serving.engine import Engine, EngineConfig  # noqa: E402
from llama_fast.serving.request import Request  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import ModelArgs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="stories110M", help="a preset of model_config.py")
    p.add_argument("--context", type=int, default=1024, help="tokens per request, prompt and output")
    p.add_argument("--rows", type=int, default=4, help="requests decoded together")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    return p


def decode_speed(model: Transformer, prompts: list, new_tokens: int, kv_cache_dtype: str) -> float:
    rows = len(prompts)
    config = EngineConfig(max_batch_size=rows, compile=True, kv_cache_dtype=kv_cache_dtype,
                          kv_cache_tokens=rows * (len(prompts[0]) + new_tokens) + 64, max_num_batched_tokens=512)
    engine = Engine(model, None, config)
    engine.warm_up()
    for prompt in prompts:
        engine.add(Request(prompt, new_tokens))
    steps = []
    while engine.has_work():
        s = engine.scheduler
        decoding = len(s.running) == rows and all(r.n_pending == 1 for r in s.running)
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            steps.append(time.perf_counter() - t0)
    return rows / statistics.median(steps)


def run(args) -> int:
    check_at_least(args, context=args.new_tokens + 2, rows=1, new_tokens=2, rounds=1)
    config = ModelArgs.from_name(args.model)
    if args.context > config.max_seq_len:
        raise ValueError(f"--context: {args.model} has a context of {config.max_seq_len} tokens")
    torch.manual_seed(0)
    model = Transformer(config).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = use_cpu_kernels(model, default_kernels(model, compiled=True))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(args.context - args.new_tokens)]
               for _ in range(args.rows)]
    ratios = []
    for i in range(args.rounds):
        speed = {}
        for dtype in ("auto", "int8") if i % 2 == 0 else ("int8", "auto"):
            speed[dtype] = decode_speed(model, prompts, args.new_tokens, dtype)
            print(f"round {i + 1}: {dtype} {speed[dtype]:.1f} tokens/s", flush=True)
        ratios.append(speed["int8"] / speed["auto"])
    print(f"int8 / model dtype, per round: {' '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    cli_main(run, build_parser().parse_args())
