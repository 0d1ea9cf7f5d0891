"""Decode-speed benchmark: tokens/s and the fraction of the memory-bandwidth roofline, both measured here.

    python scripts/bench.py --model stories110M --compile
    python scripts/bench.py --checkpoint_path checkpoints/<repo>/model.pth --compile --batch_size 4
    python scripts/bench.py --model tinyllama-1.1b --compile --draft int4     # speculative: speed-up over plain
    python scripts/bench.py --checkpoint_path .../model.pth --compile --prompt_lookup 3
    python scripts/bench.py --checkpoint_path .../model.pth --compile --lookahead 4 --lookahead_ngram 3

By default the preset is built with random weights (speed does not depend on their values), so no download or
tokenizer is needed. The roofline is tokens/s x weight bytes / the read bandwidth this process measures on a
buffer as large as the weights: 1.0 means every decode step streams the weights at the speed of a plain read.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import (CPU_GEMM_CHOICES, CPU_GEMM_HELP, CPU_KERNEL_CHOICES, CPU_KERNEL_HELP,  # noqa: E402
                            DEVICE_DEFAULT, PRECISIONS, check_at_least, check_device,
                            check_flag_rules, check_output_path, cli_main, default_device, parse)
import torch  # noqa: E402

from decoding import compile_cache_counts, generate, make_steps, peak_memory_bytes, weight_bytes  # noqa: E402
from llama_fast.checkpoint import cpu_kernels_for, load_model, tokenizer_file  # noqa: E402
from llama_fast.writing import write_json  # noqa: E402
from llama_fast.cpu.choice import metrics as cpu_kernel_metrics, use_cpu_kernels  # noqa: E402
from llama_fast.cpu.tune import randomize  # noqa: E402
from llama_fast.quant.qlinear import GROUP_SIZES, quantize_model  # noqa: E402
from llama_fast.speculate.lookahead import (LookaheadConfig, lookahead_config, lookahead_generate,  # noqa: E402
                                            lookahead_stats)
from llama_fast.speculate.speculative import (DraftModel, PromptLookup, acceptance_stats,  # noqa: E402
                                              speculative_generate)
from model import Transformer  # noqa: E402
from model_config import CONFIG_NAME, PRESETS, ModelArgs  # noqa: E402
from sampling import SamplingConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def random_model(name: str, device, dtype, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    return randomize(model.to_empty(device=device).to(dtype)).eval().requires_grad_(False)


def quantized(model: Transformer, mode: str, groupsize: int, device, dtype) -> Transformer:
    """Round-to-nearest quantize in memory, then load through a real quantized checkpoint file (what
    generate.py would run), its float weights as stored (use_kernels gives it its CPU kernels)."""
    state, meta = quantize_model(model, mode, groupsize, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save(Path(tmp) / CONFIG_NAME)
        torch.save({"quantization": meta, "state_dict": {k: v.cpu() for k, v in state.items()}}, Path(tmp) / "q.pth")
        del state, model
        return load_model(Path(tmp) / "q.pth", device, dtype, cpu_kernels="none")


def measure_bandwidth(device, nbytes: int, repeats: int = 10) -> float:
    """Read bandwidth in bytes/s: the median time to sum a buffer of nbytes (at least 256 MiB, so it is not
    served from cache any more than the weights are)."""
    device = torch.device(device)
    buf = torch.ones(max(nbytes, 256 << 20) // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        buf.sum().item()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times[1:])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories110M", help=f"preset with random weights: {', '.join(PRESETS)}")
    p.add_argument("--checkpoint_path", type=Path, help="benchmark a real checkpoint instead of a preset")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile_prefill", action="store_true", help="with --compile: prefill too (dynamic shapes)")
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16")
    p.add_argument("--device", default=default_device())
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--prompt_length", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--quantize", choices=("int8", "int4"), help="round-to-nearest weight-only quantization first")
    p.add_argument("--groupsize", type=int, default=32, help="int4 group size")
    p.add_argument("--metrics_json", type=Path)
    p.add_argument("--cpu_kernels", choices=CPU_KERNEL_CHOICES, default="auto", help=CPU_KERNEL_HELP)
    p.add_argument("--cpu_gemm", choices=CPU_GEMM_CHOICES, default="auto", help=CPU_GEMM_HELP)
    s = p.add_argument_group("speculative decoding (batch 1, greedy): tokens/s against plain decoding of the same "
                             "target, runs alternating in this process")
    s.add_argument("--draft", choices=("int8", "int4"), help="draft: a copy of the target quantized in memory")
    s.add_argument("--draft_model", help="draft: a preset with random weights (e.g. stories15M)")
    s.add_argument("--draft_checkpoint_path", type=Path, help="draft: this checkpoint")
    s.add_argument("--prompt_lookup", type=int, metavar="N", help="no draft: prompt lookup with N-grams")
    s.add_argument("--lookahead", type=int, nargs="?", const=DEVICE_DEFAULT, metavar="W", help="no draft: lookahead "
                   "decoding with W guesses per level (default: the device's)")
    s.add_argument("--lookahead_ngram", type=int, metavar="N")
    s.add_argument("--lookahead_guesses", type=int, metavar="G")
    s.add_argument("--speculate_k", type=int, default=5)
    s.add_argument("--prompt", help="prompt text (default: a built-in one; with --prompt_lookup, a passage to copy)")
    s.add_argument("--tokenizer_path", type=Path, help="to encode the prompt (default: tokenizer.model beside "
                   "--checkpoint_path); without one the prompt is --prompt_length random tokens")
    return p


def load_target(args, dtype) -> tuple[Transformer, str]:
    """The model to benchmark and its label: a checkpoint or a random preset, quantized in memory if asked; its
    weights as stored (main() gives it its CPU kernels once any draft has been quantized from it)."""
    if args.checkpoint_path:
        model = load_model(args.checkpoint_path, args.device, dtype, cpu_kernels="none")
        label = str(args.checkpoint_path)
    else:
        model, label = random_model(args.model, args.device, dtype), f"{args.model} (random weights)"
    if args.quantize:
        model = quantized(model, args.quantize, args.groupsize, args.device, dtype)
        label += f" {args.quantize}" + (f" g{args.groupsize}" if args.quantize != "int8" else "")
    return model, label


def use_kernels(args, model: Transformer) -> Transformer:
    """The model with its CPU kernels (--cpu_kernels, --cpu_gemm), as generate.py gives them."""
    return use_cpu_kernels(model, cpu_kernels_for(model, args.cpu_kernels, args.cpu_gemm, args.compile))


def speculating(a) -> bool:
    return bool(a.draft or a.draft_model or a.draft_checkpoint_path or a.prompt_lookup is not None)


# (flag, what it needs, whether args have it): see cli.check_flag_rules. Not MODEL_FLAG_RULES' --cpu_kernels inductor
# without --compile: an eager prefill of that configuration is a measurement (scripts/bench_llamacpp.py takes it)
FLAG_RULES = [("model", "is a preset with random weights: choose it or --checkpoint_path",
               lambda a: not a.checkpoint_path),
              ("compile_prefill", "needs --compile", lambda a: a.compile),
              ("groupsize", "is for int4 (--quantize int4 or --draft int4)", lambda a: "int4" in (a.quantize, a.draft)),
              ("speculate_k", "needs a draft or --prompt_lookup", speculating),
              ("lookahead_ngram", "needs --lookahead", lambda a: a.lookahead is not None),
              ("lookahead_guesses", "needs --lookahead", lambda a: a.lookahead is not None)]


def check_args(args):
    """Every argument, before a model is built."""
    check_flag_rules(args, FLAG_RULES)
    check_device(args.device)
    check_at_least(args, batch_size=1, prompt_length=1, max_new_tokens=1, num_samples=1, speculate_k=1,
                   prompt_lookup=1)
    if "int4" in (args.quantize, args.draft) and args.groupsize not in GROUP_SIZES:
        raise ValueError(f"--groupsize must be one of {', '.join(map(str, GROUP_SIZES))}, got {args.groupsize}")
    check_output_path(args.metrics_json, "--metrics_json")


def run(args) -> int:
    check_args(args)
    dtype = PRECISIONS[args.precision]
    model, label = load_target(args, dtype)
    if args.draft or args.draft_model or args.draft_checkpoint_path or args.prompt_lookup is not None or \
            args.lookahead is not None:
        bench_speculative(args, model, label, dtype)
        return 0
    if args.prompt_length + args.max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"--prompt_length {args.prompt_length} + --max_new_tokens {args.max_new_tokens} exceeds "
                         f"the model's context of {model.config.max_seq_len}")
    bench_plain(args, use_kernels(args, model), label)
    return 0


def main(argv=None):
    cli_main(run, parse(build_parser(), argv))


def bench_plain(args, model: Transformer, label: str):
    """Greedy decoding of random prompts: median tokens/s after a warm-up (compile) run, and the roofline."""
    wbytes = weight_bytes(model)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch_size, args.prompt_length), generator=gen).tolist()
    greedy, steps = SamplingConfig(temperature=0), make_steps(args.device, args.compile, args.compile_prefill)

    def run():
        return generate(model, prompts, args.max_new_tokens, greedy, steps=steps)

    t0 = time.perf_counter()
    run()  # warm-up, and compilation with --compile
    compile_seconds = time.perf_counter() - t0 if args.compile else 0.0
    bandwidth = measure_bandwidth(args.device, wbytes)
    results = [run() for _ in range(args.num_samples)]
    bandwidth = max(bandwidth, measure_bandwidth(args.device, wbytes))  # the higher reading: a stricter roofline
    tps = statistics.median(r.decode_tokens_per_sec for r in results)
    ttft = statistics.median(r.time_to_first_token for r in results)
    metrics = {
        "model": label, "device": args.device, "precision": args.precision, "compile": args.compile, "quantize": args.quantize,
        "batch_size": args.batch_size, "tokens_per_sec": tps, "total_tokens_per_sec": tps * args.batch_size,
        "time_to_first_token_s": ttft, "weight_bytes": wbytes, "achieved_bandwidth_gbps": tps * wbytes / 1e9,
        "measured_bandwidth_gbps": bandwidth / 1e9, "roofline_fraction": tps * wbytes / bandwidth,
        "compile_seconds": compile_seconds, **compile_cache_counts(), "peak_memory_bytes": peak_memory_bytes(args.device),
        "torch": torch.__version__, **cpu_kernel_metrics(model, args.compile),
    }
    kernel = metrics["cpu_kernel"]
    where = f"{args.device} ({kernel})" if kernel else args.device
    print(f"{label} {args.precision} {'compiled' if args.compile else 'eager'} batch {args.batch_size} on "
          f"{where}: {tps:.1f} tokens/s, {metrics['achieved_bandwidth_gbps']:.1f} of "
          f"{metrics['measured_bandwidth_gbps']:.1f} GB/s = {metrics['roofline_fraction']:.0%} of roofline "
          f"(weights {wbytes / 1e6:.0f} MB, compile {compile_seconds:.0f}s)")
    if args.metrics_json:
        write_json(args.metrics_json, metrics)


# An input-grounded task for prompt lookup: the answer copies the passage, as summaries, edits and RAG answers do.
PASSAGE = (
    "The lighthouse on the northern cape was built in 1871 from granite quarried two miles inland. Its lamp burned "
    "colza oil until 1904, when it was replaced by a paraffin vapour burner, and it was electrified in 1953. The "
    "keepers lived in two cottages at the foot of the tower and kept a daily log of the weather, passing ships and "
    "the state of the lamp. In the winter of 1887 a storm broke the lantern glass, and the keepers kept the light "
    "burning behind a screen of sailcloth for eleven nights until a new pane arrived by boat. The station was "
    "automated in 1989; the cottages now house a small museum with the original lens, the logbooks and a model of "
    "the tower, and the light still flashes white twice every fifteen seconds, visible for eighteen nautical miles.")
LOOKUP_PROMPT = f"Read the passage and then repeat it word for word.\n\nPassage:\n{PASSAGE}\n\nRepeated passage:\n"
DRAFT_PROMPT = "Once upon a time, in a small village by the sea, there lived"


def bench_prompt(args, vocab_size: int) -> tuple[list, str]:
    tok_path = tokenizer_file(args.checkpoint_path, args.tokenizer_path) if args.checkpoint_path else \
        args.tokenizer_path
    if tok_path is None or not tok_path.is_file():
        if args.tokenizer_path or args.prompt:
            raise FileNotFoundError(f"tokenizer not found: {tok_path}")
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (args.prompt_length,), generator=gen).tolist(), "random tokens"
    text = args.prompt or (LOOKUP_PROMPT if args.prompt_lookup else DRAFT_PROMPT)
    return load_tokenizer(tok_path).encode(text), "copy the passage" if text == LOOKUP_PROMPT else "text"


def make_proposer(args, model: Transformer, dtype):
    """(the proposer, how to describe it) for --draft, --draft_model, --draft_checkpoint_path or --prompt_lookup."""
    modes = [args.draft, args.draft_model, args.draft_checkpoint_path, args.prompt_lookup is not None,
             args.lookahead is not None]
    if sum(map(bool, modes)) != 1:
        raise ValueError("choose one of --draft, --draft_model, --draft_checkpoint_path, --prompt_lookup and "
                         "--lookahead")
    if args.batch_size != 1:
        raise ValueError("speculative decoding needs --batch_size 1")
    if args.draft and args.quantize:
        raise ValueError("--draft quantizes the float target: with --quantize, use --draft_model or "
                         "--draft_checkpoint_path")
    if args.prompt_lookup is not None:
        return PromptLookup(args.prompt_lookup), f"prompt lookup, {args.prompt_lookup}-grams"
    if args.lookahead is not None:
        window = None if args.lookahead is DEVICE_DEFAULT else args.lookahead
        cfg = lookahead_config(args.device, window, args.lookahead_ngram, args.lookahead_guesses)
        return cfg, f"lookahead W={cfg.window} N={cfg.ngram} G={cfg.guesses}"
    if args.draft:
        draft = use_kernels(args, quantized(model, args.draft, args.groupsize, args.device, dtype))
        source = f"draft: {args.draft}{f' g{args.groupsize}' if args.draft == 'int4' else ''} copy of the target"
    elif args.draft_model:
        if ModelArgs.from_name(args.draft_model).vocab_size != model.config.vocab_size:  # before building it
            raise ValueError(f"--draft_model {args.draft_model}'s vocabulary differs from the target's")
        draft = use_kernels(args, random_model(args.draft_model, args.device, dtype, seed=1))
        source = f"draft: {args.draft_model} (random)"
    else:
        draft = load_model(args.draft_checkpoint_path, args.device, dtype, cpu_kernels=args.cpu_kernels,
                           compiled=args.compile, cpu_gemm=args.cpu_gemm)
        source = f"draft: {args.draft_checkpoint_path}"
    proposer = DraftModel(draft)
    proposer.check(model)
    return proposer, source


def bench_speculative(args, model, label: str, dtype):
    """Plain greedy decoding and speculative (or lookahead) decoding of the same target, alternating, after a warm-up
    (compile) of each: median tokens/s of each, the speed-up, acceptance, what a step costs against a plain decode
    step, and whether the outputs agree."""
    proposer, source = make_proposer(args, model, dtype)
    use_kernels(args, model)  # after a draft was quantized from its weights
    lookahead = proposer if isinstance(proposer, LookaheadConfig) else None
    K = lookahead.ngram - 1 if lookahead else args.speculate_k  # proposed tokens a step can accept
    prompt, prompt_kind = bench_prompt(args, model.config.vocab_size)
    greedy, N = SamplingConfig(temperature=0), args.max_new_tokens
    steps = make_steps(args.device, args.compile)
    # one KV cache size for both: no re-allocation (or CUDA graph re-capture) between the runs
    cache = min(len(prompt) + N + (lookahead.length if lookahead else K), model.config.max_seq_len)

    def plain():
        return generate(model, [prompt], N, greedy, cache_len=cache, steps=steps)

    def speculative():
        if lookahead:
            return lookahead_generate(model, [prompt], N, greedy, lookahead=lookahead, cache_len=cache, steps=steps)
        return speculative_generate(model, [prompt], N, greedy, proposer=proposer, speculate_k=K, cache_len=cache,
                                    steps=steps)

    t0 = time.perf_counter()
    plain(), speculative()  # warm-up, and compilation with --compile
    compile_seconds = time.perf_counter() - t0 if args.compile else 0.0
    runs = [(plain(), speculative()) for _ in range(args.num_samples)]
    tps = statistics.median(p.decode_tokens_per_sec for p, _ in runs)
    spec_tps = statistics.median(s.decode_tokens_per_sec for _, s in runs)
    accepted = [n for _, s in runs for n in s.accepted]
    stats = acceptance_stats(accepted, K)
    if lookahead:
        stats |= lookahead_stats(accepted, sum(s.pool_hits for _, s in runs), lookahead)
    same = sum(p.tokens == s.tokens for p, s in runs)
    metrics = {
        "model": label, "device": args.device, "precision": args.precision, "compile": args.compile,
        "quantize": args.quantize, "proposer": source, "speculate_k": K, "prompt": prompt_kind,
        "prompt_tokens": len(prompt), "new_tokens": N, "plain_tokens_per_sec": tps,
        "speculative_tokens_per_sec": spec_tps, "speedup": spec_tps / tps, **stats,
        "step_cost": step_cost(runs), "identical_outputs": f"{same}/{len(runs)}",
        "plain_runs_tokens_per_sec": [p.decode_tokens_per_sec for p, _ in runs],
        "speculative_runs_tokens_per_sec": [s.decode_tokens_per_sec for _, s in runs],
        "compile_seconds": compile_seconds, **compile_cache_counts(), "peak_memory_bytes": peak_memory_bytes(args.device),
        "torch": torch.__version__,
    }
    mode = "compiled" if args.compile else "eager"
    print(f"{label} {args.precision} {mode} on {args.device}, {source}, k={K}, "
          f"prompt: {prompt_kind} ({len(prompt)} tokens): {spec_tps:.1f} tokens/s vs plain {tps:.1f} = "
          f"{metrics['speedup']:.2f}x; accepted {stats['mean_accepted']:.2f} of {K} per step "
          f"({stats['acceptance_rate']:.0%}), histogram {stats['acceptance_histogram']}, a step costs "
          f"{metrics['step_cost']:.2f} plain decode steps; outputs identical in {same}/{len(runs)} runs "
          f"(compile {compile_seconds:.0f}s)")
    if args.metrics_json:
        write_json(args.metrics_json, metrics)


def step_cost(runs: list) -> float:
    """The median over the runs of a speculative step's time divided by a plain decode step's (the decode time over
    its steps: speculative ones, and plain ones where a run had no proposal or no room). With tokens per step it
    gives the speed-up: speedup = tokens per step / step cost."""
    ratios = []
    for p, s in runs:
        plain_steps = max(0, s.decode_tokens - sum(n + 1 for n in s.accepted))  # from plain decode steps
        ratios.append(s.decode_seconds / (len(s.accepted) + plain_steps) / (p.decode_seconds / p.decode_tokens))
    return statistics.median(ratios)

if __name__ == "__main__":
    main()
