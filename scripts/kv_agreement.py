"""Greedy agreement of the int8 KV cache with the cache in the model's dtype, on a trained checkpoint: the same
prompts (a JSON-lines file, {"prompt": text} a line, as scripts/bench_serve.py --prompt_file reads) through the
serving engine with each pool, max_tokens new tokens each (no stop at EOS). Reports how many outputs are identical,
where the others first differ, and the share of positions with the same token.

    python scripts/kv_agreement.py --checkpoint_path checkpoints/small-code/model.pth --prompt_file free.jsonl \\
        --num_prompts 32 --max_tokens 128

A greedy token differs once the two caches' rounding moves the top two logits past each other; from there the texts
go their own ways, so the share of identical outputs falls with their length. How far the two caches are from each
other's perplexity is eval.py --kv_cache_dtype int8's to say.
"""
import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import PRECISIONS, check_at_least, cli_main  # noqa: E402

from llama_fast.checkpoint import check_is_file, load_model, read_config, tokenizer_file  # noqa: E402
from llama_fast.serving.engine import Engine, EngineConfig  # noqa: E402
from scripts.bench_serve import read_prompt_file  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", type=Path, required=True)
    p.add_argument("--prompt_file", type=Path, required=True)
    p.add_argument("--num_prompts", type=int, default=32, help="the file's first N prompts")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bfloat16")
    p.add_argument("--compile", action="store_true")
    return p


def greedy_outputs(model, prompts: list, max_tokens: int, kv_cache_dtype: str, compile: bool) -> list:
    """Each prompt's max_tokens greedy tokens from an engine whose KV pool is kv_cache_dtype. Its steps are bounded
    by the token budget alone (no time target, whose steps follow the clock), so that both pools' runs batch the
    same rows the same way: in 16 bits a row's numbers depend on what it is batched with."""
    config = EngineConfig(max_batch_size=8, kv_cache_dtype=kv_cache_dtype, compile=compile, itl_target_ms=math.inf)
    engine = Engine(model, None, config)
    return [r.output for r in engine.generate(prompts, max_tokens)]


def agreement(reference: list, other: list) -> dict:
    """identical: outputs equal token for token; first_difference: where each of the others first differs
    (median, min); same_position: the share of positions holding the same token."""
    firsts = [next(i for i, (a, b) in enumerate(zip(x, y)) if a != b) for x, y in zip(reference, other) if x != y]
    same = sum(a == b for x, y in zip(reference, other) for a, b in zip(x, y))
    return {"outputs": len(reference), "identical": len(reference) - len(firsts),
            "first_difference_median": statistics.median(firsts) if firsts else None,
            "first_difference_min": min(firsts) if firsts else None,
            "same_position": same / sum(len(x) for x in reference)}


def run(args) -> int:
    check_at_least(args, num_prompts=1, max_tokens=1)
    check_is_file(args.checkpoint_path, "checkpoint")
    texts = read_prompt_file(args.prompt_file)[:args.num_prompts]
    tokenizer = load_tokenizer(tokenizer_file(args.checkpoint_path, None))
    prompts = [tokenizer.encode(t, bos=True) for t in texts]
    context = read_config(args.checkpoint_path).max_seq_len
    for i, prompt in enumerate(prompts, 1):  # before the model loads
        if len(prompt) + args.max_tokens > context:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: with --max_tokens {args.max_tokens}, more than "
                             f"the model's context of {context}")
    model = load_model(args.checkpoint_path, "cpu", PRECISIONS[args.precision])
    outputs = {kv: greedy_outputs(model, prompts, args.max_tokens, kv, args.compile) for kv in ("auto", "int8")}
    print(summary(agreement(outputs["auto"], outputs["int8"]), args.max_tokens))
    return 0


def summary(figures: dict, max_tokens: int) -> str:
    """The figures of agreement() in one line."""
    identical, outputs = figures["identical"], figures["outputs"]
    line = f"{identical} of {outputs} outputs of {max_tokens} tokens identical with an int8 KV cache"
    if identical < outputs:
        line += (f"; the others first differ at token {figures['first_difference_median']:g} (median; earliest "
                 f"{figures['first_difference_min']})")
    return line + f"; {100 * figures['same_position']:.1f}% of positions hold the same token"


def main(argv=None):
    cli_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
