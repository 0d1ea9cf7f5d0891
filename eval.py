"""Evaluate a checkpoint with EleutherAI's lm-evaluation-harness (lm-eval 0.4.x), or measure the perplexity of a
local text file.

    python eval.py --checkpoint_path checkpoints/<repo>/model.pth --tasks hellaswag winogrande --limit 200
    python eval.py --checkpoint_path checkpoints/<repo>/model_int8.pth --text_file wiki.test.raw

LlamaFastLM is an lm-eval model (lm_eval.api.model.TemplateLM) over our Transformer: loglikelihood (multiple
choice), loglikelihood_rolling (perplexity) and generate_until (generative tasks), so any task lm-eval's
TaskManager knows runs, plus local task YAMLs (--include_path). Datasets come from the Hugging Face cache;
HF_DATASETS_OFFLINE=1 uses it without the network.
"""
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import (MODEL_FLAG_RULES, PRECISIONS, add_kv_cache_arg, add_model_args, check_at_least,
                            check_device, check_flag_rules, check_memory, check_output_path, check_outputs, cli_main,
                            parse, read_text_file)
import argparse
import difflib
import json
import math
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor
from tqdm import tqdm

from decoding import StreamDecoder, compile_dynamic, generate, make_steps
from llama_fast.checkpoint import (check_is_file, check_vocab, device_bytes, files_read, load_model, read_config,
                                   tokenizer_file)
from llama_fast.quant.kv_cache import use_int8_kv_cache
from llama_fast.writing import write_json
from sampling import SamplingConfig
from tokenizer import load_tokenizer
import tp

DEFAULT_MAX_LENGTH = 2048  # scoring windows default to this or the model's context, whichever is shorter


def score_through_cache(model, tokens: Tensor) -> Tensor:
    """The logits of tokens (B, T) computed through the model's KV cache from position 0 (every key and value
    written to it, then read back from it), not by a cacheless forward."""
    return model(tokens, torch.arange(tokens.shape[1], device=tokens.device))


def load(checkpoint_path: Path, tokenizer_path: Path | None = None, device="cpu", precision=torch.bfloat16,
         tensor_parallel: bool = False, cpu_kernels: str = "auto", cpu_gemm: str = "auto"):
    """(model, tokenizer) for evaluation; tensor_parallel: this rank's shard (see tp.py)."""
    model = load_model(checkpoint_path, device, precision, tensor_parallel, cpu_kernels, cpu_gemm=cpu_gemm)
    tokenizer = load_tokenizer(tokenizer_file(checkpoint_path, tokenizer_path))
    check_vocab(tokenizer, model)
    return model, tokenizer


class LlamaFastLM(TemplateLM):
    """lm-eval's model interface over a Transformer. Tokenisation follows lm-eval's HF backend with a Llama
    tokenizer: texts are encoded with BOS, a continuation is what encoding context + continuation adds to the
    context's tokens (TemplateLM._encode_pair), and the empty context is BOS alone."""

    def __init__(self, model, tokenizer, batch_size: int = 1, max_length: int = 0, compile: bool = False,
                 max_gen_toks: int = 256, rank: int = 0, kv_cache_dtype: str = "auto"):
        super().__init__()
        self.model, self.tok = model, tokenizer
        # lm-eval's own rank stays 0: under tensor parallelism every process runs every request
        self.batch_size, self.max_gen_toks, self.process_rank = batch_size, max_gen_toks, rank
        context = model.config.max_seq_len
        if max_length > context:
            raise ValueError(f"--max_seq_length {max_length} exceeds the model's context of {context} tokens")
        self.max_length = max_length or min(DEFAULT_MAX_LENGTH, context)
        self._device = model.output.weight.device
        # Scoring sees every sequence length; generation decodes over a KV cache of one fixed length when compiled.
        self.score = compile_dynamic(model) if compile else model
        if kv_cache_dtype == "int8":  # scored through the int8 cache: keys and values as it stores and reads them
            use_int8_kv_cache(model)
            self.through_cache = compile_dynamic(score_through_cache) if compile else score_through_cache
            self.score = self.score_through_cache
        self.steps = make_steps(self.device.type, compile)
        # compiled decoding keeps one KV cache length, so that the decode step is one graph
        self.cache_len = self.max_length if compile else 0

    def score_through_cache(self, tokens: Tensor) -> Tensor:
        self.model.setup_caches(self.batch_size, self.max_length)  # generation may have sized it otherwise
        return self.through_cache(self.model, tokens)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:  # conditions the empty context and a document's first token
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id  # no BOS (Qwen): EOS, as HFLM

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        return self.tok.encode(string, bos=add_special_tokens is not False)

    def progress(self, total: int, desc: str, disable: bool):
        return tqdm(total=total, desc=desc, disable=disable or self.process_rank != 0)

    # ----------------------------------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """requests: (key for lm-eval's cache or None, context ids, continuation ids) -> (sum of the continuation's
        log-probabilities, whether greedy decoding would produce it). Longest first, in batches of similar length,
        right-padded (causal attention never looks right, so padding changes nothing)."""
        results = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        with self.progress(len(requests), "loglikelihood", disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                # context + continuation without its last token, left-truncated to max_length (as HFLM does)
                inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):-1] for i in batch]
                width = max(map(len, inputs))
                tokens = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=self.device)
                logits = self.score(tokens)
                for i, x, row in zip(batch, inputs, logits):
                    cache_key, _, continuation = requests[i]
                    if not 0 < len(continuation) <= len(x):
                        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                                         f"{self.max_length}-token window")
                    logprobs = row[len(x) - len(continuation):len(x)].float().log_softmax(-1)
                    target = torch.tensor(continuation, device=self.device)
                    results[i] = (logprobs.gather(-1, target[:, None]).sum().item(),
                                  bool((logprobs.argmax(-1) == target).all()))
                    if cache_key is not None:
                        self.cache_hook.add_partial("loglikelihood", cache_key, results[i])
                bar.update(len(batch))
        return results

    def score_documents(self, documents: list, disable_tqdm: bool = False) -> list:
        """Total log-probability of each token list, every token predicted once, the first from BOS: windows of
        max_length tokens (lm-eval's get_rolling_token_windows with one token of context), all documents' windows
        scored together in batches."""
        windows, owners = [], []
        for n, tokens in enumerate(documents):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(documents)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += logprob
        return totals

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        # Encoded with BOS, as lm-eval's HF backend encodes them for Llama tokenizers: BOS is also the prefix, so the
        # first window scores BOS after BOS too. Kept so that task numbers match `lm_eval --model hf`'s;
        # text_perplexity scores every token once.
        texts = [req.args[0] for req in requests]
        totals = self.score_documents([self.tok_encode(t) for t in texts], disable_tqdm)
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # -------------------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Greedy (or, with do_sample, sampled) continuations through generate(), each cut before the first of its
        `until` stop strings, at most max_gen_toks tokens. Requests with the same generation arguments are batched
        (left-padded by generate()); a batch ends when every row has hit EOS or a stop string."""
        results = [None] * len(requests)
        groups = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        with self.progress(len(requests), "generate_until", disable_tqdm) as bar:
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
                until = [s for s in kwargs["until"] if s]
                temperature = float(kwargs.get("temperature") or 0) if kwargs["do_sample"] else 0.0
                sampling = SamplingConfig(temperature, top_k=kwargs.get("top_k") or 0, top_p=kwargs.get("top_p") or 1.0)
                indices.sort(key=lambda i: -len(requests[i].args[0]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    texts = self.generate_text([requests[i].args[0] for i in batch], kwargs["max_gen_toks"], until,
                                               sampling)
                    for i, text in zip(batch, texts):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return results

    def generate_text(self, contexts: list, max_gen_toks: int, until: list,
                      sampling: SamplingConfig = SamplingConfig(temperature=0)) -> list:
        """The continuations of a batch of texts, each cut before the first occurrence of any stop string."""
        room = self.max_length - max_gen_toks
        if room < 1:
            raise ValueError(f"max_gen_toks ({max_gen_toks}) must be less than the {self.max_length}-token window")
        prompts = [self.tok_encode(c)[-room:] for c in contexts]  # left-truncated, as HFLM does
        streams = [StreamDecoder(self.tok) for _ in prompts]
        for stream, prompt in zip(streams, prompts):  # primed with the prompt: the first word keeps its space
            stream.push(prompt)
        texts, done = [""] * len(prompts), [False] * len(prompts)

        def on_token(step, token):
            for row, t in enumerate(token[:, 0].tolist()):
                if not done[row]:
                    done[row] = t in self.tok.eos_ids
                    if not done[row]:
                        texts[row] += streams[row].push([t])
                        done[row] = any(s in texts[row] for s in until)
            return all(done)  # ends generation early once every row has its answer

        generate(self.model, prompts, max_gen_toks, sampling, self.tok.eos_ids, on_token=on_token,
                 steps=self.steps, cache_len=self.cache_len)
        texts = [text + stream.flush() for text, stream in zip(texts, streams)]
        return [min((t.split(s)[0] for s in until), key=len, default=t) for t in texts]


# ------------------------------------------------------------------------------------------------------- CLI

def text_perplexity(lm: LlamaFastLM, path: Path, text: str | None = None) -> dict:
    """Token-, word- and byte-level perplexity of a whole text file (or of its `text`, read before the scoring),
    scored as one document. A perplexity past a float's range (word perplexity of text with few spaces: Chinese,
    minified code) is left out with a note: the scoring's other results are kept."""
    text = read_text_file(path, "text file") if text is None else text
    tokens = lm.tok_encode(text, add_special_tokens=False)
    if not tokens:
        raise ValueError(f"{path} is empty")
    nll = -lm.score_documents([tokens])[0]
    n_words, n_bytes = len(text.split()), len(text.encode("utf-8"))
    out = {"file": str(path), "tokens": len(tokens), "words": n_words, "bytes": n_bytes}
    for unit, n in (("token", len(tokens)), ("word", max(n_words, 1)), ("byte", n_bytes)):
        try:
            out[f"{unit}_perplexity"] = math.exp(nll / n)
        except OverflowError:
            out[f"{unit}_perplexity"] = None
            out.setdefault("notes", []).append(f"{unit}_perplexity left out: exp({nll / n:.0f}) is past a float's "
                                               f"range ({n} {unit}s for {len(tokens)} tokens)")
    return out | {"bits_per_byte": nll / n_bytes / math.log(2)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on lm-eval tasks or a local text file.")
    add_model_args(p)
    p.add_argument("--tasks", nargs="+", default=[], metavar="TASK", help="lm-eval task, group or tag names")
    p.add_argument("--text_file", type=Path, help="also report the perplexity of this text file (e.g. WikiText-2)")
    p.add_argument("--include_path", type=Path, help="a folder of extra task YAMLs")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--num_fewshot", type=int, help="default: each task's own")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_seq_length", type=int, default=0,
                   help=f"scoring window and generation context (default: the model's context, at most "
                        f"{DEFAULT_MAX_LENGTH})")
    p.add_argument("--compile", action="store_true", help="torch.compile scoring (dynamic shapes) and decoding")
    add_kv_cache_arg(p, "; scoring and generation go through it, to measure what it costs")
    p.add_argument("--output_path", type=Path, help="write the results here as JSON")
    return p


def check_task_files(folder: Path):
    """Every task YAML under --include_path parses (lm-eval would skip a broken one and call its task unknown)."""
    import yaml

    if not folder.is_dir():
        raise FileNotFoundError(f"--include_path {folder} is not a folder")

    class Loader(yaml.SafeLoader):  # lm-eval's own tags (!function) are lm-eval's to check
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for path in sorted(folder.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 -- a SafeLoader
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise ValueError(f"task file {path}{where}: {getattr(e, 'problem', None) or e}") from None


def check_tasks(args):
    """The TaskManager (lm-eval's tasks plus --include_path), after checking that every task name exists."""
    if args.include_path:
        check_task_files(args.include_path)
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(args.include_path) if args.include_path else None)
    known = set(manager.all_tasks)
    for name in args.tasks:
        if name not in known and not Path(name).is_file():  # lm-eval also takes a task YAML's path
            close = difflib.get_close_matches(name, known, n=3)
            raise ValueError(f"unknown task {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return manager


FLAG_RULES = [*MODEL_FLAG_RULES,  # (flag, what it needs, whether args have it): see cli.check_flag_rules
              *[(flag, "is for --tasks (a --text_file is scored whole)", lambda a: a.tasks)
                for flag in ("limit", "num_fewshot", "include_path")]]


def check_args(args):
    """Every flag acts or is refused, every number is in range, the inputs are readable and the output is no
    input: before the model loads and hours of scoring."""
    if not args.tasks and not args.text_file:
        raise ValueError("nothing to evaluate: pass --tasks and/or --text_file")
    check_flag_rules(args, FLAG_RULES)
    if args.limit is not None and (args.limit <= 0 or (args.limit >= 1 and args.limit != int(args.limit))):
        raise ValueError("--limit must be a whole number of documents or a fraction in (0, 1)")
    check_at_least(args, batch_size=1, max_seq_length=0, num_fewshot=0)
    check_device(args.device)
    check_is_file(args.checkpoint_path, "checkpoint")
    check_output_path(args.output_path, "--output_path")
    text = read_text_file(args.text_file, "text file") if args.text_file else None  # UTF-8, or refused now
    check_outputs({"--output_path": args.output_path}, {**files_read(args.checkpoint_path, args.tokenizer_path),
                                                         "--text_file": args.text_file})
    return text


def check_fits(args):
    """A batch of scoring windows fits memory before the model loads: per token of a window the logits (in the
    model's dtype, and a float32 log-softmax), one layer's attention scores and FFN activations, and its KV cache;
    on a GPU the weights too."""
    config = read_config(args.checkpoint_path)
    length = args.max_seq_length or min(DEFAULT_MAX_LENGTH, config.max_seq_len)
    itemsize = PRECISIONS[args.precision].itemsize
    per_token = config.vocab_size * (itemsize + 4) + 4 * (config.n_heads * length + 3 * config.intermediate_size) + \
        2 * config.n_layers * config.n_kv_heads * config.head_dim * itemsize
    weights = device_bytes([args.checkpoint_path], args.device)
    check_memory((weights + args.batch_size * length * per_token) // tp.world_size(), args.device,
                 f"scoring {args.batch_size} windows of {length} tokens", " (lower --batch_size or --max_seq_length)")


def run(args) -> int:
    text = check_args(args)
    check_fits(args)
    manager = check_tasks(args) if args.tasks else None
    args.device = tp.maybe_init_dist(args.device)  # under torchrun: every rank scores every request on its shard
    rank = tp.rank()
    if tp.world_size() > 1:  # tasks that sample draw the same numbers on every rank
        torch.manual_seed(tp.shared_seed())
    model, tokenizer = load(args.checkpoint_path, args.tokenizer_path, args.device, PRECISIONS[args.precision],
                            tensor_parallel=tp.world_size() > 1, cpu_kernels=args.cpu_kernels, cpu_gemm=args.cpu_gemm)
    lm = LlamaFastLM(model, tokenizer, args.batch_size, args.max_seq_length, args.compile, rank=rank,
                     kv_cache_dtype=args.kv_cache_dtype)
    out = {}
    if args.tasks:
        import lm_eval
        from lm_eval.utils import make_table
        limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, task_manager=manager, limit=limit,
                                              num_fewshot=args.num_fewshot, log_samples=False)
        except ConnectionError as e:  # a dataset neither cached nor downloadable (offline)
            raise ValueError(f"cannot load a task's dataset: {str(e).splitlines()[0]} (see README: Evaluation)")
        if rank == 0 and results is not None:
            print(make_table(results))
            if results.get("groups"):
                print(make_table(results, "groups"))
            out = json.loads(json.dumps(results, default=str))  # dtypes, functions in configs: as strings
    if args.text_file:
        ppl = text_perplexity(lm, args.text_file, text)
        if rank == 0:
            print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ppl.items()
                             if k != "notes"))
            for note in ppl.get("notes", []):
                print(f"note: {note}")
        out["text_perplexity"] = ppl
    if rank == 0 and args.output_path:
        quantization = getattr(model, "quantization", None) or {}
        out["llama_fast"] = {"checkpoint_path": str(args.checkpoint_path), "precision": args.precision,
                             "device": args.device, "quantization": quantization.get("mode"),
                             "max_length": lm.max_length, "batch_size": args.batch_size, "compile": args.compile,
                             "kv_cache_dtype": args.kv_cache_dtype}
        write_json(args.output_path, out)
    return 0


def main(argv=None):
    cli_main(run, parse(build_parser(), argv))


if __name__ == "__main__":
    main()
