"""Generate text from the command line: one prompt streamed, a batch of different prompts, speculative or lookahead
decoding, or an interactive chat; under torchrun, tensor-parallel.

    python generate.py --compile --checkpoint_path checkpoints/<repo>/model.pth --prompt "Hello, my name is"
"""
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import (DEVICE_DEFAULT, MODEL_FLAG_RULES, PRECISIONS, SEED_RANGE, add_kv_cache_arg,
                            add_model_args, check_at_least, check_device, check_flag_rules,
                            check_memory, check_output_path, check_outputs, check_ranges, check_text, cli_main,
                            parse, read_text_file)
import argparse
import contextlib
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from decoding import (GenerationResult, StreamDecoder, compile_cache_counts, generate, make_steps, peak_memory_bytes,
                      weight_bytes)
from llama_fast.chat.interactive import chat
from llama_fast.chat.templates import NO_TEMPLATE, chat_template
from llama_fast.checkpoint import (check_is_file, check_vocab, device_bytes, files_read, load_model, read_config,
                                   tokenizer_file)
from llama_fast.cpu.choice import metrics as cpu_kernel_metrics
from llama_fast.quant.kv_cache import use_int8_kv_cache
from llama_fast.speculate.lookahead import LookaheadConfig, lookahead_config, lookahead_generate, lookahead_stats
from llama_fast.speculate.speculative import (DraftModel, PromptLookup, acceptance_stats, check_speculation,
                                              speculative_generate)
from llama_fast.writing import atomic_save, save_trace, write_json
from sampling import SamplingConfig
from tokenizer import load_tokenizer
import tp

DEFAULT_BATCH_SIZE = 16  # prompts generated together when --batch_size is not given; a prompt file runs in batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate text with a Llama-family model.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch of different prompts")
    p.add_argument("--prompt_file", type=Path, help="one prompt per line")
    p.add_argument("--interactive", action="store_true", help="chat using the tokenizer's chat template")
    p.add_argument("--system", help="system prompt for --interactive")
    p.add_argument("--chat_template", metavar="NAME_OR_FILE", help="--interactive's chat format: llama2, llama3, a "
                   "Jinja file or a tokenizer_config.json (default: the tokenizer_config.json beside the tokenizer)")
    p.add_argument("--num_samples", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--batch_size", type=int, help=f"prompts generated together (default: the number of prompts, at "
                   f"most {DEFAULT_BATCH_SIZE}); more prompts run in batches of it, fewer are repeated to fill it")
    p.add_argument("--max_seq_length", type=int, default=0, help="KV cache length (default: prompt + new tokens; "
                   "the model's context with --interactive)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top_k", type=int, default=200, help="0 disables")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--min_p", type=float, default=0.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--frequency_penalty", type=float, default=0.0)
    p.add_argument("--presence_penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens (benchmarks)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--compile_prefill", action="store_true", help="also compile prefill, with dynamic shapes")
    add_kv_cache_arg(p)
    p.add_argument("--draft_checkpoint_path", type=Path, help="speculative decoding with this draft model (same "
                   "tokenizer: a smaller model or a quantized copy of the target)")
    p.add_argument("--prompt_lookup", type=int, metavar="N", help="speculative decoding without a draft model: "
                   "propose what followed the last earlier occurrence of the last N tokens")
    p.add_argument("--speculate_k", type=int, help="tokens proposed per target forward pass (default 5)")
    p.add_argument("--lookahead", type=int, nargs="?", const=DEVICE_DEFAULT, metavar="W", help="lookahead decoding "
                   "(no draft model) with W Jacobi guesses per level (alone: the device's default, see README)")
    p.add_argument("--lookahead_ngram", type=int, metavar="N", help="lookahead n-gram length N (N - 1 levels)")
    p.add_argument("--lookahead_guesses", type=int, metavar="G", help="lookahead candidates verified per step")
    p.add_argument("--metrics_json", type=Path, help="write per-sample and mean metrics here")
    p.add_argument("--profile", type=Path, help="write a torch.profiler trace of the last sample here")
    return p


# --------------------------------------------------------------------------------- checking the arguments

def interactive_excludes(flag: str) -> tuple:
    return flag, "does not apply to --interactive (a chat reads its turns from the terminal)", \
        lambda a: not a.interactive


FLAG_RULES = [*MODEL_FLAG_RULES,  # (flag, what it needs, whether args have it): see cli.check_flag_rules
              ("compile_prefill", "needs --compile", lambda a: a.compile),
              ("system", "is the system prompt of --interactive, which is not given", lambda a: a.interactive),
              ("chat_template", "is the chat format of --interactive, which is not given", lambda a: a.interactive),
              *map(interactive_excludes, ("prompt", "prompt_file", "num_samples", "batch_size", "ignore_eos",
                                          "metrics_json", "profile")),
              ("speculate_k", "needs --draft_checkpoint_path or --prompt_lookup",
               lambda a: a.draft_checkpoint_path or a.prompt_lookup is not None),
              ("lookahead_ngram", "needs --lookahead", lambda a: a.lookahead is not None),
              ("lookahead_guesses", "needs --lookahead", lambda a: a.lookahead is not None)]


def check_args(args):
    """Every flag acts or is refused, every number is in range: before anything is read or loaded."""
    check_flag_rules(args, FLAG_RULES)
    check_at_least(args, max_new_tokens=1, num_samples=1, batch_size=1, max_seq_length=0, speculate_k=1,
                   prompt_lookup=1)
    check_ranges(args, seed=SEED_RANGE)


def read_prompts(args) -> tuple[list, int]:
    """(the prompts, the batch size they run in: fewer prompts than a batch are repeated to fill it, once the
    memory for it has been checked)."""
    prompts = [check_text(p, "--prompt") for p in args.prompt or []]
    if args.prompt_file:
        lines = [line for line in read_text_file(args.prompt_file, "prompt file").splitlines() if line.strip()]
        if not lines:  # not the built-in prompt: the user meant to give some
            raise ValueError(f"prompt file {args.prompt_file} has no non-blank line")
        prompts += lines
    prompts = prompts or ["Hello, my name is"]
    batch_size = min(len(prompts), DEFAULT_BATCH_SIZE) if args.batch_size is None else args.batch_size
    if batch_size > len(prompts) and batch_size % len(prompts):
        raise ValueError(f"--batch_size {batch_size} is not a multiple of the {len(prompts)} prompts given")
    return prompts, batch_size  # more prompts than a batch run in batches: one KV cache of batch_size rows


def sampling_config(args) -> SamplingConfig:
    return SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                          args.frequency_penalty, args.presence_penalty)


def speculate_k(args, sampling: SamplingConfig, batch_size: int) -> int:
    """K for --draft_checkpoint_path / --prompt_lookup (0: plain decoding), checked before anything is loaded."""
    if not args.draft_checkpoint_path and args.prompt_lookup is None:
        return 0
    if args.draft_checkpoint_path and args.prompt_lookup is not None:
        raise ValueError("choose one of --draft_checkpoint_path and --prompt_lookup")
    if args.interactive:
        raise ValueError("speculative decoding does not support --interactive")
    k = 5 if args.speculate_k is None else args.speculate_k
    check_speculation(batch_size, sampling, k)
    return k


def lookahead_settings(args, sampling: SamplingConfig, batch_size: int, k: int) -> LookaheadConfig | None:
    """The --lookahead settings (None: not asked for), the device's defaults where not given, checked before
    anything is loaded."""
    if args.lookahead is None:
        return None
    if k:
        raise ValueError("choose one of --lookahead, --draft_checkpoint_path and --prompt_lookup")
    if args.interactive:
        raise ValueError("lookahead decoding does not support --interactive")
    check_speculation(batch_size, sampling, 1, "lookahead decoding")
    window = None if args.lookahead is DEVICE_DEFAULT else args.lookahead  # --lookahead alone: the device's
    return lookahead_config(args.device, window, args.lookahead_ngram, args.lookahead_guesses)


def check_step_fits(k: int, la: LookaheadConfig | None, longest: int, context: int):
    """A speculative step's K + 1 tokens (lookahead's L) fit the context after the prompt: otherwise every step
    would quietly be a plain decoding step."""
    width, flag = (la.length, f"--lookahead {la.window}") if la else (k + 1, f"--speculate_k {k}")
    if (k or la) and longest + width > context:
        raise ValueError(f"{flag}: a step's forward of {width} tokens does not fit the model's context of {context} "
                         f"after the {longest}-token prompt")


def memory_needed(config, rows: int, longest: int, cache_len: int, args) -> int:
    """What generating takes on top of the weights, on this rank: the static KV cache (int8: a float16 scale per
    vector), and the prefill's largest passing tensors (one layer's attention scores and FFN activations, and the
    logits, counted in float32)."""
    heads, kv_heads = (n // tp.world_size() for n in (config.n_heads, config.n_kv_heads))
    per_vector = config.head_dim + 2 if args.kv_cache_dtype == "int8" else \
        config.head_dim * PRECISIONS[args.precision].itemsize
    cache = 2 * config.n_layers * rows * cache_len * kv_heads * per_vector
    passing = rows * longest * (heads * cache_len + 3 * config.intermediate_size) + rows * config.vocab_size
    return cache + 4 * passing


def start_processes(args):
    """The device this process runs on; under torchrun a process group, and the same seed on every rank."""
    check_device(args.device)
    check_output_path(args.metrics_json, "--metrics_json")  # before the model loads, not after the run
    check_output_path(args.profile, "--profile")
    check_outputs({"--metrics_json": args.metrics_json, "--profile": args.profile}, {
        **files_read(args.checkpoint_path, args.tokenizer_path), "--prompt_file": args.prompt_file,
        **(files_read(args.draft_checkpoint_path, what="the draft") if args.draft_checkpoint_path else {})})
    args.device = tp.maybe_init_dist(args.device)  # under torchrun: a process group, and this rank's GPU
    if tp.world_size() > 1 and args.interactive:
        raise ValueError("--interactive does not run under torchrun (tensor parallelism): only rank 0 has a terminal")
    if tp.world_size() > 1 and args.seed is None:  # every rank must draw the same random numbers to sample alike
        args.seed = tp.shared_seed()
    if args.seed is not None:
        torch.manual_seed(args.seed)


# ------------------------------------------------------------------------------------------------ the run

def read_inputs(args, texts: list):
    """(tokenizer, token-id prompts, the checkpoint's ModelArgs): what the checks before loading the weights need."""
    check_is_file(args.checkpoint_path, "checkpoint")
    config = read_config(args.checkpoint_path)
    tokenizer = load_tokenizer(tokenizer_file(args.checkpoint_path, args.tokenizer_path))
    check_vocab(tokenizer, config)
    return tokenizer, [tokenizer.encode(t) for t in texts], config


def load(args, k: int):
    """(model, proposer or None), every file checked."""
    t0, tensor_parallel = time.perf_counter(), tp.world_size() > 1
    precision = PRECISIONS[args.precision]
    model = load_model(args.checkpoint_path, args.device, precision, tensor_parallel, args.cpu_kernels, args.compile,
                       args.cpu_gemm)
    if args.kv_cache_dtype == "int8":  # the target's cache; a draft model keeps its own dtype
        use_int8_kv_cache(model)
    proposer = PromptLookup(args.prompt_lookup) if k and args.prompt_lookup else None
    if args.draft_checkpoint_path:  # under torchrun the draft is sharded like the target: each rank streams half
        proposer = DraftModel(load_model(args.draft_checkpoint_path, args.device, precision, tensor_parallel,
                                         args.cpu_kernels, args.compile, args.cpu_gemm))
        proposer.check(model)
    print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return model, proposer


def check_fits(args, config, prompts: list, batch_size: int, k: int, la):
    """Before the weights load: the longest prompt and a speculative step fit the context, and the KV cache and
    the activations (on a GPU the weights too) fit memory."""
    longest, context = max(map(len, prompts), default=0), config.max_seq_len
    if longest >= context:
        raise ValueError(f"prompt of {longest} tokens does not fit the model's context of {context}")
    check_step_fits(k, la, longest, context)
    extra = la.length if la else k + 1 if k else 0
    rows, cache_len = (1, args.max_seq_length or context) if args.interactive else \
        (batch_size, max(args.max_seq_length, longest + args.max_new_tokens + extra))
    cache_len = min(cache_len, context)
    weights = device_bytes([args.checkpoint_path, args.draft_checkpoint_path], args.device) // tp.world_size()
    check_memory(weights + memory_needed(config, rows, longest, cache_len, args), args.device,
                 f"generating {rows} rows of {cache_len} tokens (the KV cache and the prefill's activations)",
                 " (lower --batch_size, --max_seq_length or --max_new_tokens, or pass --kv_cache_dtype int8)")


def run(args) -> int:
    check_args(args)
    sampling = sampling_config(args)
    start_processes(args)
    texts, batch_size = ([], 1) if args.interactive else read_prompts(args)
    args.batch_size = batch_size  # resolved: what the metrics report
    k = speculate_k(args, sampling, batch_size)
    la = lookahead_settings(args, sampling, batch_size, k)
    tokenizer, prompts, config = read_inputs(args, texts)
    template = chat_template(tokenizer, args.chat_template) if args.interactive else None
    if args.interactive and template is None:
        raise ValueError(f"--interactive: {NO_TEMPLATE}")
    check_fits(args, config, prompts, batch_size, k, la)
    if prompts and batch_size > len(prompts):  # a benchmark's batch: the prompts repeated to fill it
        texts, prompts = (x * (batch_size // len(prompts)) for x in (texts, prompts))
    model, proposer = load(args, k)
    steps = make_steps(args.device, args.compile, args.compile_prefill)
    if args.interactive:
        chat(model, tokenizer, template, sampling, args.system, args.max_seq_length, args.max_new_tokens, steps)
        return 0

    eos_ids = () if args.ignore_eos else tokenizer.eos_ids

    def gen(batch: list, on_token=None):
        options = dict(cache_len=args.max_seq_length, steps=steps, on_token=on_token)
        if la:
            return lookahead_generate(model, batch, args.max_new_tokens, sampling, eos_ids, lookahead=la, **options)
        if proposer:
            return speculative_generate(model, batch, args.max_new_tokens, sampling, eos_ids, proposer=proposer,
                                        speculate_k=k, **options)
        return generate(model, batch, args.max_new_tokens, sampling, eos_ids, **options)

    compiled = {"compile_seconds": 0.0}
    if args.compile:  # compile (and warm up) outside the measured samples
        t0 = time.perf_counter()
        gen(prompts[:batch_size])
        compiled = {"compile_seconds": time.perf_counter() - t0, **compile_cache_counts()}
        print(f"Compilation time: {compiled['compile_seconds']:.2f} seconds ({compiled['graphs_from_cache']} graphs "
              f"from inductor's cache, {compiled['graphs_compiled']} compiled)", file=sys.stderr)
    wbytes = weight_bytes(model)
    run_all = in_batches(gen, batch_size)
    samples = [timed_run(i, run_all, args, tokenizer, texts, prompts, eos_ids, wbytes, k, la)
               for i in range(args.num_samples)]
    report(args, samples, sampling, wbytes, compiled, k, la,
           cpu_kernel_metrics(model, args.compile))
    return 0


def in_batches(gen, batch_size: int):
    """gen over every prompt, batch_size at a time (one KV cache of batch_size rows, whatever the number of
    prompts); on_batch(first row, result) follows each batch, and the results are merged into one."""
    def run_all(prompts: list, on_token=None, on_batch=None) -> GenerationResult:
        results = []
        for start in range(0, len(prompts), batch_size):
            results.append(gen(prompts[start:start + batch_size], on_token))
            if on_batch:
                on_batch(start, results[-1])
        return merged(results)
    return run_all


def merged(results: list) -> GenerationResult:
    """One result for consecutive batches: the rows in order, the first batch's time to first token, and the
    decode time and steps summed (so tokens/s per sequence is over all of them)."""
    if len(results) == 1:
        return results[0]
    def rows(name: str) -> list:
        return [x for r in results for x in getattr(r, name)]

    return GenerationResult(rows("tokens"), rows("prompt_tokens"), results[0].time_to_first_token,
                            sum(r.decode_seconds for r in results), sum(r.decode_tokens for r in results),
                            rows("stopped"), rows("accepted"), sum(r.pool_hits for r in results))


def timed_run(i: int, run_all, args, tokenizer, texts, prompts, eos_ids, wbytes: int, k: int, la) -> dict:
    """Run i of --num_samples: generate (streamed when there is one prompt), print the text and the run's metrics."""
    profiling = args.profile and i == args.num_samples - 1 and tp.rank() == 0
    # trace CUDA kernels only when generating on CUDA (a CUDA build would set up CUPTI for a CPU run too)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    prof = torch.profiler.profile(activities=activities) if profiling else contextlib.nullcontext()
    stream = StreamDecoder(tokenizer) if len(prompts) == 1 else None

    def show(step, token):
        t = token[0, 0].item()
        if t not in eos_ids:
            print(stream.push([t]), end="", flush=True)

    def print_batch(start: int, result):  # each batch as it is done: a long prompt file shows progress
        for text, prompt, row in zip(texts[start:], prompts[start:], result.tokens):
            new = [t for t in row if t not in eos_ids]
            print(f"--- {text}{tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)):]}")

    if stream:  # the prompt primes the decoder, so the first new word keeps its leading space
        stream.push(prompts[0])
        print(texts[0], end="", flush=True)
    with prof:
        result = run_all(prompts, show if stream else None, None if stream else print_batch)
    if profiling:
        atomic_save(prof, args.profile, save=save_trace)
    if stream:
        print(stream.flush())
    return run_metrics(i, result, args.batch_size, wbytes, k, la)


def run_metrics(i: int, result, batch_size: int, wbytes: int, k: int, la) -> dict:
    m = {"time_to_first_token_s": result.time_to_first_token, "decode_tokens_per_sec": result.decode_tokens_per_sec,
         "total_tokens_per_sec": result.decode_tokens_per_sec * batch_size,
         "bandwidth_gbps": wbytes * result.decode_tokens_per_sec / 1e9,
         "new_tokens": [len(r) for r in result.tokens], "prompt_tokens": result.prompt_tokens}
    print(f"[sample {i}] time to first token {m['time_to_first_token_s'] * 1000:.1f} ms, "
          f"{m['decode_tokens_per_sec']:.2f} tokens/s per sequence, {m['bandwidth_gbps']:.2f} GB/s", file=sys.stderr)
    if k:
        m |= {"accepted": result.accepted, **acceptance_stats(result.accepted, k)}
        print(f"[sample {i}] accepted per verify step: mean {m['mean_accepted']:.2f} of {k}, "
              f"histogram {m['acceptance_histogram']}", file=sys.stderr)
    if la:
        m |= {"accepted": result.accepted, **lookahead_stats(result.accepted, result.pool_hits, la)}
        print(f"[sample {i}] lookahead: {m['tokens_per_step']:.2f} tokens per step, histogram "
              f"{m['tokens_per_step_histogram']}, pool hits {m['pool_hits']} of {m['lookahead_steps']}",
              file=sys.stderr)
    return m


def report(args, samples: list, sampling: SamplingConfig, wbytes: int, compiled: dict, k: int, la, kernels: dict):
    """The means over the samples on stderr, and everything in --metrics_json (rank 0 only)."""
    mean = {key: sum(s[key] for s in samples) / len(samples) for key in
            ("time_to_first_token_s", "decode_tokens_per_sec", "total_tokens_per_sec", "bandwidth_gbps")}
    summary = {**mean, "peak_memory_bytes": peak_memory_bytes(args.device), **compiled,
               "weight_bytes": wbytes, "batch_size": args.batch_size, "device": args.device,
               "precision": args.precision, **kernels, "samples": samples, "sampling": asdict(sampling),
               "world_size": tp.world_size()}  # under tensor parallelism weight_bytes and bandwidth are per rank
    print(f"Average: {mean['decode_tokens_per_sec']:.2f} tokens/s per sequence, "
          f"{mean['bandwidth_gbps']:.2f} GB/s{' per rank' if tp.world_size() > 1 else ''}, "
          f"time to first token {mean['time_to_first_token_s'] * 1000:.1f} ms, "
          f"peak memory {summary['peak_memory_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    if k:
        stats = acceptance_stats([n for s in samples for n in s["accepted"]], k)
        summary["speculative"] = {"draft": str(args.draft_checkpoint_path or ""),
                                  "prompt_lookup": args.prompt_lookup or 0, "speculate_k": k, **stats}
        print(f"Speculative: {stats['mean_accepted']:.2f} of {k} proposed tokens accepted per verify "
              f"step ({stats['acceptance_rate']:.0%}), histogram {stats['acceptance_histogram']}", file=sys.stderr)
    if la:
        stats = lookahead_stats([n for s in samples for n in s["accepted"]], sum(s["pool_hits"] for s in samples), la)
        summary["lookahead"] = {**asdict(la), **stats}
        print(f"Lookahead (W={la.window}, N={la.ngram}, G={la.guesses}): {stats['tokens_per_step']:.2f} tokens per "
              f"step, histogram {stats['tokens_per_step_histogram']}, pool hits {stats['pool_hits']} of "
              f"{stats['lookahead_steps']} steps", file=sys.stderr)
    if args.metrics_json and tp.rank() == 0:
        write_json(args.metrics_json, summary)


def main(argv=None):
    cli_main(run, parse(build_parser(), argv))


if __name__ == "__main__":
    main()
