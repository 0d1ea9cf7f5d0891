"""What a lookahead step costs: the time of its L-token forward (lookahead.py: L = (N - 1)(W + G)) against a plain
1-token decode step of the same model, both compiled, interleaved in one process (median of --repeats each).

    python scripts/bench_lookahead_cost.py --model stories110M tinyllama-1.1b --metrics_json cost.json

A step pays when its tokens per step exceed this ratio (speed-up = tokens per step / step cost); lookahead.py's
defaults per device come from this table. Random weights: the cost does not depend on their values.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import (PRECISIONS, check_at_least, check_device, check_output_path, cli_main,  # noqa: E402
                            default_device)
import torch  # noqa: E402

from bench import random_model  # noqa: E402
from decoding import make_steps, sync  # noqa: E402
from llama_fast.writing import write_json  # noqa: E402
from llama_fast.cpu.choice import choose_kernels, use_cpu_kernels  # noqa: E402
from llama_fast.speculate.lookahead import LookaheadConfig, layout, lookahead_step  # noqa: E402
from model_config import PRESETS  # noqa: E402
from sampling import SamplingConfig  # noqa: E402

CONFIGS = ["1,2,1", "2,3,1", "3,3,2", "4,3,2", "3,4,2", "4,4,3", "5,4,3", "7,4,5", "10,5,10", "15,5,15"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["stories110M"], choices=sorted(PRESETS))
    p.add_argument("--configs", nargs="+", default=CONFIGS, metavar="W,N,G")
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bfloat16")
    p.add_argument("--context", type=int, default=512, help="KV cache slots (at most the model's context); the "
                   "steps run at its middle")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--metrics_json", type=Path)
    return p


def parse_configs(texts: list) -> list:
    configs = []
    for text in texts:
        parts = text.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--configs takes W,N,G triples of whole numbers, not {text!r}")
        configs.append(LookaheadConfig(*map(int, parts)))
    return configs


def timed(fn, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # each step ends in a host read (.item() / .tolist()), as in decoding
        times.append(time.perf_counter() - t0)
    return times


def cost_table(model, configs: list, device, context: int, repeats: int) -> list:
    context = min(context, model.config.max_seq_len)
    if max(c.length for c in configs) > context // 2:
        raise ValueError(f"a {context}-token context leaves no room for a {max(c.length for c in configs)}-token step")
    model.setup_caches(1, context)
    steps, greedy, pos = make_steps(device, compile=True), SamplingConfig(temperature=0), context // 2
    token, input_pos = torch.tensor([[5]], device=device), torch.tensor([pos], device=device)

    def decode():
        return steps.decode(model, token, input_pos, None, greedy, None, None).item()

    rows = []
    for cfg in configs:
        tree, offsets = (t.to(device) for t in layout(cfg))
        tokens = torch.randint(0, model.config.vocab_size, (1, cfg.length), device=device)
        start = torch.tensor([pos], device=device)

        def step():
            return steps.compiled(lookahead_step)(model, tokens, start, offsets, tree,
                                                  1 + cfg.guesses * (cfg.ngram - 1), greedy).tolist()

        for _ in range(3):  # compile and warm up both
            decode(), step()
        one, many = [], []
        for _ in range(repeats // 5):  # interleaved blocks: both see the same machine state
            one += timed(decode, 5)
            many += timed(step, 5)
        sync(torch.device(device))
        rows.append({"window": cfg.window, "ngram": cfg.ngram, "guesses": cfg.guesses, "tokens": cfg.length,
                     "one_token_ms": 1e3 * statistics.median(one), "step_ms": 1e3 * statistics.median(many),
                     "cost": statistics.median(many) / statistics.median(one)})
        print(f"  W={cfg.window:2d} N={cfg.ngram} G={cfg.guesses:2d} L={cfg.length:3d}: {rows[-1]['step_ms']:.2f} ms "
              f"against {rows[-1]['one_token_ms']:.2f} ms = {rows[-1]['cost']:.2f}x", flush=True)
    return rows


def run(args) -> int:
    check_device(args.device)
    check_at_least(args, context=16, repeats=5)
    check_output_path(args.metrics_json, "--metrics_json")
    configs = parse_configs(args.configs)
    results = {}
    for name in args.model:
        model = random_model(name, args.device, PRECISIONS[args.precision])
        kernel = use_cpu_kernels(model, choose_kernels(model)).cpu_kernels.linear if args.device == "cpu" else ""
        print(f"{name} {args.precision} on {args.device} {kernel}:", flush=True)
        results[name] = cost_table(model, configs, args.device, args.context, args.repeats)
        del model
    print("\n| W | N | G | L | " + " | ".join(f"{name} step / 1-token" for name in results) + " |")
    print("| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in results) + " |")
    for i, cfg in enumerate(configs):
        cells = " | ".join(f"{rows[i]['step_ms']:.1f} / {rows[i]['one_token_ms']:.1f} ms = **{rows[i]['cost']:.2f}x**"
                           for rows in results.values())
        print(f"| {cfg.window} | {cfg.ngram} | {cfg.guesses} | {cfg.length} | {cells} |")
    if args.metrics_json:
        write_json(args.metrics_json, {"device": args.device, "precision": args.precision, "context": args.context,
                                       "torch": torch.__version__, "models": results})
    return 0


def main(argv=None):
    cli_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
