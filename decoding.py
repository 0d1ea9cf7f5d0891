"""The decoding core: the step functions, their compilation, and generate() (prefill, then token-by-token decode
over the static KV cache). generate.py, eval.py, speculative.py, lookahead.py and the benchmarks all decode through
here.

    steps = make_steps("cuda", compile=True)      # one static-shape graph per step (CUDA graphs on CUDA)
    out = generate(model, [prompt_ids], 100, SamplingConfig(temperature=0), eos_ids, steps=steps)

A step function is what runs once per forward pass; `Steps` names them all, and make_steps() compiles them (lazily:
a step is compiled on its first call). A new decoding method adds its step here, to Steps and make_steps.
StreamDecoder turns the ids into text as they come, for printing (and serving) a reply live.
"""
import functools
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from model import Transformer
from sampling import SamplingConfig, apply_penalties, draw, sample, token_probs

# ------------------------------------------------------------------------------------------------- the steps


def prefill(model, tokens, input_pos, left_pad, cfg, seen, counts):
    """The prompt's forward pass (B, T) -> the first new token (B, 1)."""
    logits = model(tokens, input_pos, left_pad, last_only=True)[:, -1]
    if cfg.penalized:
        logits = apply_penalties(logits, cfg, seen, counts)
    return sample(logits, cfg)


def decode_one_token(model, token, input_pos, left_pad, cfg, seen, counts):
    """One decode step (B, 1) -> the next token (B, 1): prefill's computation, in a function of its own because
    dynamo caches compiled graphs per function: the decode step's static graph and prefill's dynamic one stay apart."""
    return prefill(model, token, input_pos, left_pad, cfg, seen, counts)


def draft_step(model, token, input_pos, cfg):
    """One decode step of a draft model: (drafted token (1, 1), the distribution it was drawn from (1, V))."""
    probs = token_probs(model(token, input_pos)[:, -1], cfg)
    return (probs.argmax(-1, keepdim=True) if cfg.greedy else draw(probs)), probs


def verify(model, tokens, input_pos, cfg):
    """The target's forward over the last token and the K proposed ones, (1, K + 1) at positions input_pos (always
    K + 1 of them, so it compiles to one graph): its distributions (K + 1, V) for each next token."""
    return token_probs(model(tokens, input_pos)[0], cfg)


@dataclass(frozen=True)
class Steps:
    """The step functions a decoding loop calls: eager by default, compiled by make_steps(compile=True)."""
    prefill: Callable = prefill
    decode: Callable = decode_one_token
    draft: Callable = draft_step  # speculative decoding: a draft model's decode step
    verify: Callable = verify  # speculative decoding: the target's (K + 1)-token forward
    device: str | None = None  # the device these were compiled for; None: eager
    features: dict = field(default_factory=dict, compare=False, repr=False)  # compiled(): {step: compiled step}

    def compiled(self, step: Callable) -> Callable:
        """A feature's own fixed-shape step function (lookahead decoding's), compiled as these were (once per
        function), or as it is when these are eager."""
        if self.device is None:
            return step
        if step not in self.features:
            self.features[step] = compile_static(step, self.device)
        return self.features[step]


def make_steps(device: str, compile: bool = False, compile_prefill: bool = False) -> Steps:
    """The steps for `device`: with compile, every fixed-shape step is one graph (compile_static) and prefill, whose
    length varies, is compiled with dynamic shapes only if compile_prefill."""
    if not compile:
        return Steps()
    return Steps(prefill=compile_dynamic(prefill) if compile_prefill else prefill,
                 decode=compile_static(decode_one_token, device), draft=compile_static(draft_step, device),
                 verify=compile_static(verify, device), device=device)


def cpu_inductor(options=None):
    """Inductor for CPU steps, keeping aten.addmv a call to ATen's GEMV kernel instead of decomposing it into a
    slower generated reduction (see model.Linear). Two choices keep inductor's on-disk cache working, so a second
    run of the same command loads its graphs (tinyllama: 3.6 s instead of a 14 s compile): weights are not frozen
    into the graph (the AOT autograd cache refuses frozen graphs, and freezing was no faster here), and the addmv
    decomposition is removed from inductor's own table, not passed as a table of ours (which cannot be pickled into
    a cache key). The Python wrapper, not the C++ one: the C++ wrapper cannot call the layers' shared graph
    (model.TransformerBlock.shared_forward), and decoded no faster."""
    from torch._inductor import decomposition, lowering
    from torch._inductor.compile_fx import compile_fx
    # ATen calls, not inductor's versions: addmv would be decomposed into a slower generated reduction, and
    # inductor's int4 lowering passes the group size as a tensor constant that a shared layer graph breaks
    for op in (torch.ops.aten.addmv.default, torch.ops.aten._weight_int4pack_mm_for_cpu.default):
        decomposition.decompositions.pop(op, None)
        if op not in lowering.fallbacks:
            lowering.lowerings.pop(op, None)
            lowering.make_fallback(op, warn=False, override_decomp=True)
    return functools.partial(compile_fx, config_patches=options or {})


def compile_dynamic(fn, backend="inductor"):
    """torch.compile with dynamic shapes (a prefill of any length, eval's batches), floats specialized."""
    return specialize_floats(torch.compile(fn, fullgraph=True, dynamic=True, backend=backend))


def specialize_floats(compiled):
    """A compiled function that traces floats as constants: with symbolic floats (a module's constant such as
    RMSNorm's eps would be one, once a recompile makes inputs dynamic) the layers' shared graph
    (model.TransformerBlock.shared_forward) cannot be traced."""
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)
    return run


# CUDA graphs (what mode="reduce-overhead" sets) and, as gpt-fast, coordinate descent tuning: with it inductor writes
# a one-token matmul as a product and a sum, fusing the int8 -> bf16 conversion of Int8Linear's weights into their
# one read (H200: 1118 GB/s against 538 for a bf16 copy + cuBLAS; scripts/bench_cuda_linear.py, BENCHMARKS.md GPU)
CUDA_COMPILE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


def compile_static(step, device: str):
    """torch.compile a step whose shapes never change, so that it is one graph: with CUDA graphs on CUDA; on CPU
    with cpu_inductor()."""
    if device.startswith("cuda"):
        return torch.compile(step, fullgraph=True, options=CUDA_COMPILE_OPTIONS)
    if device == "cpu":
        return torch.compile(step, fullgraph=True, backend=cpu_inductor())
    return torch.compile(step, fullgraph=True)


# --------------------------------------------------------------------------------------------------- generate

EOS_CHECK_EVERY = 8  # decode steps between checks whether every row has stopped (each check is a host sync)


@dataclass
class GenerationResult:
    tokens: list  # per row: the new tokens, ending with the EOS token where one was produced
    prompt_tokens: list  # per row: prompt length
    time_to_first_token: float  # seconds: prefill and the first sampled token
    decode_seconds: float  # the time after the first token
    decode_tokens: int  # tokens produced per sequence after the first (the loop's length: the same for every row)
    stopped: list = field(default_factory=list)  # per row: True if it ended at EOS
    accepted: list = field(default_factory=list)  # speculative_generate: draft tokens accepted at each verify step
    pool_hits: int = 0  # lookahead_generate: steps whose n-gram pool had candidates to verify

    @property
    def decode_tokens_per_sec(self) -> float:  # per sequence
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Batch:
    """A batch of prompts laid out for the model: left-padded token ids (B, T), the padding per row (None when all
    rows have the same length) and, with penalties, which tokens each row has seen and how often it produced
    them (B, V)."""
    tokens: Tensor
    left_pad: Tensor | None
    seen: Tensor | None = None
    counts: Tensor | None = None

    @classmethod
    def of(cls, prompts: list, vocab_size: int, penalized: bool, device) -> "Batch":
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        tokens = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
        left_pad = torch.tensor([T - n for n in lengths], device=device) if len(set(lengths)) > 1 else None
        batch = cls(tokens, left_pad)
        if penalized:
            batch.counts = torch.zeros(len(prompts), vocab_size, device=device)
            batch.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device).scatter_(1, tokens, True)
            if left_pad is not None:  # the padding id is not part of the prompt
                batch.seen[:, 0] = torch.tensor([0 in p for p in prompts], device=device)
        return batch

    def add(self, token: Tensor):
        """Count a sampled token (B, 1) for the penalties."""
        if self.counts is not None:
            self.counts.scatter_add_(1, token, torch.ones_like(token, dtype=self.counts.dtype))
            self.seen.scatter_(1, token, True)


def check_room(model: Transformer, prompts: list, max_new_tokens: int, start_pos: int) -> int:
    """max_new_tokens, shortened to what fits the model's context after the prompts."""
    T, context = max(map(len, prompts)), model.config.max_seq_len
    if min(map(len, prompts)) == 0:
        raise ValueError("empty prompt")
    if start_pos + T >= context:
        raise ValueError(f"prompt of {start_pos + T} tokens does not fit the model's context of {context} tokens")
    max_new_tokens = min(max_new_tokens, context - start_pos - T)
    if start_pos and (len(prompts) != 1 or start_pos + T + max_new_tokens > model.cache_len):
        raise ValueError("continuing from start_pos needs batch size 1 and room in the existing KV cache")
    return max_new_tokens


@torch.inference_mode()
def generate(model: Transformer, prompts: list, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             eos_ids=(), *, start_pos: int = 0, cache_len: int = 0, steps: Steps = Steps(),
             on_token=None) -> GenerationResult:
    """Generate for a batch of token-id prompts (lists of different lengths are left-padded and masked, so each
    row produces what it would alone). Each row stops at its own EOS; the loop ends when all rows have (checked
    every EOS_CHECK_EVERY steps, to avoid a host sync per token) or after max_new_tokens.

    start_pos > 0 continues a single conversation already held in the KV cache (interactive chat).
    cache_len sets the KV cache length (default: just long enough). on_token(step, tokens (B, 1)) streams;
    if it returns True, generation ends there (eval.py stops at stop strings this way).
    """
    max_new_tokens = check_room(model, prompts, max_new_tokens, start_pos)
    device, T = model.output.weight.device, max(map(len, prompts))
    if not start_pos:
        model.setup_caches(len(prompts), max(cache_len, T + max_new_tokens))
    batch = Batch.of(prompts, model.config.vocab_size, sampling.penalized, device)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)

    t0 = time.perf_counter()
    input_pos = torch.arange(start_pos, start_pos + T, device=device)
    token = steps.prefill(model, batch.tokens, input_pos, batch.left_pad, sampling, batch.seen, batch.counts).clone()
    out = torch.empty(len(prompts), max_new_tokens, dtype=torch.long, device=device)
    out[:, :1] = token
    done = torch.isin(token[:, 0], eos)
    halted = bool(on_token(0, token)) if on_token else False
    sync(device)
    ttft = time.perf_counter() - t0

    input_pos = torch.tensor([start_pos + T], device=device)
    n = 0  # tokens after the first
    for i in range(1, 1 if halted else max_new_tokens):
        batch.add(token)
        token = steps.decode(model, token, input_pos, batch.left_pad, sampling, batch.seen, batch.counts).clone()
        input_pos += 1
        out[:, i : i + 1] = token
        done |= torch.isin(token[:, 0], eos)
        n = i
        if on_token and on_token(i, token):
            break
        if (on_token or i % EOS_CHECK_EVERY == 0) and bool(done.all()):
            break
    sync(device)
    decode_seconds = time.perf_counter() - t0 - ttft
    rows, stopped = cut_at_eos(out[:, : n + 1].tolist(), eos_ids)
    return GenerationResult(rows, [len(p) for p in prompts], ttft, decode_seconds, n, stopped)


def cut_at_eos(rows: list, eos_ids) -> tuple[list, list]:
    """Each row up to and including its first EOS, and whether it had one."""
    cut, stopped = [], []
    for row in rows:
        end = next((j for j, t in enumerate(row) if t in eos_ids), None)
        cut.append(row if end is None else row[: end + 1])
        stopped.append(end is not None)
    return cut, stopped


# ---------------------------------------------------------------------------------------------------- metrics

def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read per decode step: every tensor of the state dict once, except the embedding table
    (one row is read), unless it is tied to the output projection and so read whole; of a mixture of experts' stacked
    experts, the n_active_experts a token is routed to (batch 1)."""
    config = getattr(model, "config", None)
    active = config.n_active_experts / config.n_experts if config is not None and config.n_experts else 1
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN-prepacked weights are opaque: no data pointer
        if name == "tok_embeddings.weight" or key in seen:
            continue
        seen.add(key)
        experts = ".feed_forward.w" in name and active < 1
        total += round(t.numel() * t.element_size() * (active if experts else 1))
    return total


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def compile_cache_counts() -> dict:
    """Graphs inductor loaded from its on-disk cache ($TORCHINDUCTOR_CACHE_DIR, by default under /tmp) and graphs
    it compiled, in this process so far: a second run of the same command should only load."""
    from torch._dynamo.utils import counters
    inductor = counters["inductor"]
    return {"graphs_from_cache": inductor["fxgraph_cache_hit"],
            "graphs_compiled": inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"]}


class StreamDecoder:
    """Turns ids into text as they are generated, for printing a reply live.

    Everything push() returns, plus flush(), concatenates to exactly
    tokenizer.decode(all ids). Like vLLM's incremental detokenizer it decodes a
    short window of recent ids with and without the text already emitted, and
    emits the difference -- unless that ends in U+FFFD, meaning a multi-byte
    character is still incomplete. Each push costs O(window), not O(total); the
    window only grows while text is held back (an unfinished character) or while
    ids produce no text at all (eos/bos).
    """

    def __init__(self, tokenizer):  # any of tokenizer.py's
        self.tokenizer = tokenizer
        self._ids = []  # the window: ids before it have been emitted and dropped
        self._read = 0  # ids in the window before this index have been emitted

    def push(self, ids: list[int]) -> str:
        self._ids += ids
        done = self.tokenizer.decode(self._ids[:self._read])
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        new = text[len(done):]
        if new:
            # Keep the ids just emitted as context. They produced text, so
            # SentencePiece's "strip the leading space of the first piece" rule
            # acts inside them, on text already emitted, never on new text.
            # (Ids that produced nothing, like eos, don't count as context.)
            self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return new

    def flush(self) -> str:
        """Return the remaining text (e.g. a dangling partial character as U+FFFD)
        and start over, ready for a new stream."""
        done = self.tokenizer.decode(self._ids[:self._read])
        rest = self.tokenizer.decode(self._ids)[len(done):]
        self._ids, self._read = [], 0
        return rest
