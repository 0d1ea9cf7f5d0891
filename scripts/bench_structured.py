"""What structured output costs in the serving engine: decode tokens/s of requests held to a JSON schema against the
same requests unconstrained, generating the same number of tokens, in one process (random weights of a preset's
shape in bf16, a real tokenizer, compiled); and what a new schema costs before its first token (the tokenizer's
vocabulary read once per engine, then each schema compiled once and cached).

    python scripts/bench_structured.py --model stories110M --tokenizer ../shared/data/llama2-tokenizer.model \\
        --rows 1 8 --rounds 4

The schema asks for a list of --items records (an enum, a bounded integer, a short string), so that every request
writes about the same number of tokens; the unconstrained requests generate exactly as many, ignoring EOS. Each
round runs both, alternating which goes first; reported: each run's output tokens/s (first step to last), and the
median of the per-round ratios.
"""
import argparse
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
from llama_fast.serving.grammar import Grammars  # noqa: E402
from llama_fast.serving.request import Request  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import ModelArgs  # noqa: E402
from sampling import SamplingConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="stories110M", help="a preset of model_config.py")
    p.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer file (its vocabulary is the mask's)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="requests decoded together (each a run)")
    p.add_argument("--items", type=int, default=8, help="records the schema asks for")
    p.add_argument("--rounds", type=int, default=4)
    return p


def schema(items: int, tag: str = "") -> dict:
    record = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "bird"]},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "name" + tag: {"type": "string", "maxLength": 6}},
              "required": ["kind", "age", "name" + tag]}
    return {"type": "object", "properties": {"pets": {"type": "array", "items": record, "minItems": items,
                                                      "maxItems": items}}, "required": ["pets"]}


def timed(engine: Engine, requests: list) -> float:
    """Output tokens/s, from the first step to the last."""
    for r in requests:
        engine.add(r)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    return sum(len(r.output) for r in requests) / (time.perf_counter() - t0)


def run(args) -> int:
    check_at_least(args, items=1, rounds=1)
    if min(args.rows) < 1:
        raise ValueError(f"--rows must be at least 1, not {min(args.rows)}")
    tokenizer = load_tokenizer(args.tokenizer)
    config = ModelArgs.from_name(args.model)
    torch.manual_seed(0)
    model = Transformer(config).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = use_cpu_kernels(model, default_kernels(model, compiled=True))
    t0 = time.perf_counter()
    Grammars(tokenizer, config.vocab_size)
    print(f"reading the vocabulary ({config.vocab_size} tokens): {time.perf_counter() - t0:.3f} s")
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max(args.rows), compile=True))
    engine.warm_up()
    for i in range(3):
        t0 = time.perf_counter()
        engine.grammars.matcher(schema(args.items, tag=str(i)))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.grammars.matcher(schema(args.items, tag=str(i)))
        again = time.perf_counter() - t0
        print(f"a new schema: compiled in {first * 1e3:.1f} ms; again (cached) {again * 1e3:.2f} ms")
    prompt, eos, sampling = tokenizer.encode("A list of pets as JSON:"), tuple(tokenizer.eos_ids), SamplingConfig(0.8)
    for rows in args.rows:
        ratios = []
        for round in range(args.rounds):
            constrained = [Request(prompt, 512, sampling, eos_ids=eos, seed=round * 100 + i,
                                   grammar=engine.grammars.matcher(schema(args.items))) for i in range(rows)]
            speed = {"constrained": timed(engine, constrained)}
            lengths = [len(r.output) for r in constrained]
            free = [Request(prompt, n, sampling, seed=round * 100 + i) for i, n in enumerate(lengths)]
            speed["unconstrained"] = timed(engine, free)
            if round % 2:  # the other order too: whichever runs second finds warmer caches
                speed["constrained"] = (speed["constrained"] + timed(engine, [
                    Request(prompt, 512, sampling, eos_ids=eos, seed=round * 100 + i,
                            grammar=engine.grammars.matcher(schema(args.items))) for i in range(rows)])) / 2
            ratios.append(speed["constrained"] / speed["unconstrained"])
            print(f"rows {rows} round {round + 1}: constrained {speed['constrained']:.1f} tokens/s, unconstrained "
                  f"{speed['unconstrained']:.1f} ({statistics.mean(lengths):.0f} tokens each)", flush=True)
        print(f"rows {rows}: constrained / unconstrained per round {' '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    cli_main(run, build_parser().parse_args())
