"""Text generation: prefill, then token-by-token decode over a static KV cache, optionally torch.compile'd.

    python generate.py --compile --checkpoint_path checkpoints/<repo>/model.pth --prompt "Hello, my name is"
"""
import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import tp
from model import CONFIG_NAME, ModelArgs, Transformer
from tokenizer import StreamDecoder, TokenizerError, load_tokenizer

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------- loading

def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def load_model(checkpoint_path, device="cpu", precision=torch.bfloat16, tensor_parallel=False) -> Transformer:
    """Build the model described by model_config.json beside the checkpoint and load its weights (no pickled
    code is executed: torch.load runs with weights_only=True, or the file is safetensors). Quantized checkpoints
    from quantize.py get their quantized modules, packed for the device. precision=None keeps stored dtypes.
    tensor_parallel=True keeps only this rank's shard (tp.apply_tp) of the process group tp.maybe_init_dist set up."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config_path = path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: convert the model with scripts/convert_hf_checkpoint.py")
    try:
        config = ModelArgs.load(config_path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid {config_path}: {e}") from None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint at all: say so in one line
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"cannot read checkpoint {path}: not a state dict")
    quantization = state.get("quantization") if isinstance(state.get("quantization"), dict) else None
    if quantization:  # written by quantize.py: {"quantization": {...}, "state_dict": {...}}
        state = state["state_dict"]
    with torch.device("meta"):
        model = Transformer(config)
    if quantization:
        from quantize import swap_in_quantized
        swap_in_quantized(model, quantization["layers"], quantization.get("groupsize") or 0)
    tied = config.tie_embeddings and isinstance(model.output, torch.nn.Linear)  # a quantized output is its own copy
    if tied:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match {config_path}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight
    if tensor_parallel:  # before the move to the device and the int4 packing: a rank never holds the whole model
        try:
            tp.apply_tp(model)
        except ValueError as e:  # the model does not divide: say which one (a target or its draft)
            raise ValueError(f"{path}: {e}") from None
    model = model.to(device=device, dtype=precision).eval().requires_grad_(False)
    if quantization:
        from quantize import pack_for_device
        pack_for_device(model)
        model.quantization = quantization
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read per decode step: every tensor of the state dict once, except the embedding table
    (one row is read), unless it is tied to the output projection and so read whole."""
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        if name == "tok_embeddings.weight" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 200  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output tokens, as in HF and vLLM
    frequency_penalty: float = 0.0  # over output tokens, as in OpenAI and vLLM
    presence_penalty: float = 0.0

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty, self.frequency_penalty, self.presence_penalty) != (1.0, 0.0, 0.0)


def apply_penalties(logits: Tensor, cfg: SamplingConfig, seen: Tensor, counts: Tensor) -> Tensor:
    """logits (B, V); seen (B, V) bool: token occurs in prompt or output; counts (B, V): occurrences in output."""
    if cfg.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if cfg.frequency_penalty:
        logits = logits - cfg.frequency_penalty * counts
    if cfg.presence_penalty:
        logits = logits - cfg.presence_penalty * (counts > 0)
    return logits


def logits_to_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """Temperature, then top-k, top-p and min-p truncation, each on the renormalised distribution."""
    logits = logits / max(cfg.temperature, 1e-5)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= cfg.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if cfg.min_p > 0:
        probs = probs.masked_fill(probs < cfg.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def draw(weights: Tensor) -> Tensor:
    """(..., V) non-negative weights (not necessarily normalised) -> (..., 1) ids drawn in proportion to them."""
    # argmax(w / E) with E ~ Exp(1) draws from w (the exponential race) and needs no torch.multinomial sync.
    return (weights / torch.empty_like(weights).exponential_(1)).argmax(-1, keepdim=True)


def sample(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(B, V) float logits -> (B, 1) token ids, without a host synchronisation."""
    if cfg.greedy:
        return logits.argmax(-1, keepdim=True)
    return draw(logits_to_probs(logits, cfg))


# ------------------------------------------------------------------------------------------------- generation

def prefill(model, tokens, input_pos, left_pad, cfg, seen, counts):
    logits = model(tokens, input_pos, left_pad, last_only=True)[:, -1]
    if cfg.penalized:
        logits = apply_penalties(logits, cfg, seen, counts)
    return sample(logits, cfg)


def decode_one_token(model, token, input_pos, left_pad, cfg, seen, counts):
    return prefill(model, token, input_pos, left_pad, cfg, seen, counts)


def cpu_inductor(options=None):
    """Inductor with frozen weights and the C++ wrapper (no Python between kernels), which keeps aten.addmv as a
    call to ATen's GEMV kernel instead of decomposing it into a slower generated reduction (see model.Linear)."""
    from torch._inductor import lowering
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    addmv = torch.ops.aten.addmv.default
    if addmv not in lowering.lowerings:  # an explicit fallback: the implicit one is an error when $CI is set
        lowering.make_fallback(addmv, warn=False, override_decomp=True)
    table = {op: fn for op, fn in select_decomp_table().items() if op != addmv}
    return functools.partial(compile_fx, config_patches=options or {"freezing": True, "cpp_wrapper": True},
                             decompositions=table)


def compile_static(step, device: str):
    """torch.compile a step whose shapes never change, so that it is one graph: with CUDA graphs on CUDA; on CPU
    with frozen weights and the C++ wrapper, which removes most of the per-step Python overhead."""
    if device.startswith("cuda"):
        return torch.compile(step, mode="reduce-overhead", fullgraph=True)
    if device == "cpu":
        return torch.compile(step, fullgraph=True, backend=cpu_inductor())
    return torch.compile(step, fullgraph=True)


def compile_steps(device: str, compile_prefill: bool = False):
    """(prefill_fn, decode_fn) for generate(): the decode step always has the same shapes (compile_static)."""
    decode = compile_static(decode_one_token, device)
    return (torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill), decode


@dataclass
class GenerationResult:
    tokens: list  # per row: the new tokens, ending with the EOS token where one was produced
    prompt_tokens: list  # per row: prompt length
    time_to_first_token: float  # seconds: prefill and the first sampled token
    decode_seconds: float
    decode_steps: int  # decode forward passes after the first token (the same for every row); speculative: tokens
    stopped: list = field(default_factory=list)  # per row: True if it ended at EOS
    accepted: list = field(default_factory=list)  # speculative_generate: draft tokens accepted at each verify step

    @property
    def decode_tokens_per_sec(self) -> float:  # per sequence
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Transformer, prompts: list, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             eos_ids=(), *, start_pos: int = 0, max_seq_len: int = 0, steps=(prefill, decode_one_token),
             on_token=None, check_every: int = 8) -> GenerationResult:
    """Generate for a batch of token-id prompts (lists of different lengths are left-padded and masked, so each
    row produces what it would alone). Each row stops at its own EOS; the loop ends when all rows have (checked
    every `check_every` steps to avoid a host sync per token) or after max_new_tokens.

    start_pos > 0 continues a single conversation already held in the KV cache (interactive chat).
    max_seq_len sets the KV cache length (default: just long enough). on_token(step, tokens (B, 1)) streams;
    if it returns True, generation ends there (eval.py stops at stop strings this way).
    """
    prefill_fn, decode_fn = steps
    device = model.output.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("empty prompt")
    T = max(lengths)
    context = model.config.max_seq_len
    if start_pos + T >= context:
        raise ValueError(f"prompt of {start_pos + T} tokens does not fit the model's context of {context} tokens")
    max_new_tokens = min(max_new_tokens, context - start_pos - T)
    if start_pos:
        if B != 1 or start_pos + T + max_new_tokens > model.max_seq_len:
            raise ValueError("continuing from start_pos needs batch size 1 and room in the existing KV cache")
    else:
        model.setup_caches(B, max(max_seq_len, T + max_new_tokens))

    tokens = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    left_pad = None
    if len(set(lengths)) > 1:
        left_pad = torch.tensor([T - n for n in lengths], device=device)
    seen = counts = None
    if sampling.penalized:
        V = model.config.vocab_size
        counts = torch.zeros(B, V, device=device)
        seen = torch.zeros(B, V, dtype=torch.bool, device=device).scatter_(1, tokens, True)
        if left_pad is not None:  # the padding id is not part of the prompt
            seen[:, 0] = torch.tensor([0 in p for p in prompts], device=device)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)

    t0 = time.perf_counter()
    input_pos = torch.arange(start_pos, start_pos + T, device=device)
    token = prefill_fn(model, tokens, input_pos, left_pad, sampling, seen, counts).clone()
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    out[:, :1] = token
    done = torch.isin(token[:, 0], eos)
    halted = bool(on_token(0, token)) if on_token else False
    _sync(device)
    ttft = time.perf_counter() - t0

    input_pos = torch.tensor([start_pos + T], device=device)
    steps_done = 0
    for i in range(1, 1 if halted else max_new_tokens):
        if sampling.penalized:
            counts.scatter_add_(1, token, torch.ones_like(token, dtype=counts.dtype))
            seen.scatter_(1, token, True)
        token = decode_fn(model, token, input_pos, left_pad, sampling, seen, counts).clone()
        input_pos += 1
        out[:, i : i + 1] = token
        done |= torch.isin(token[:, 0], eos)
        steps_done = i
        if on_token and on_token(i, token):
            break
        if (on_token or i % check_every == 0) and bool(done.all()):
            break
    _sync(device)
    decode_seconds = time.perf_counter() - t0 - ttft

    rows, stopped = [], []
    for row in out[:, : steps_done + 1].tolist():
        ends = [j for j, t in enumerate(row) if t in eos_ids]
        rows.append(row[: ends[0] + 1] if ends else row)
        stopped.append(bool(ends))
    return GenerationResult(rows, lengths, ttft, decode_seconds, steps_done, stopped)


# ---------------------------------------------------------------------------------------- speculative decoding

def token_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(..., V) logits -> the distribution sample() draws from: one-hot at the argmax when greedy, which turns
    accept_draft's rule into "accept while the draft's token is the target's argmax"."""
    if cfg.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return logits_to_probs(logits, cfg)


def draft_step(model, token, input_pos, cfg):
    """One decode step of the draft model: (drafted token (1, 1), the distribution it was drawn from (1, V))."""
    probs = token_probs(model(token, input_pos)[:, -1], cfg)
    return (probs.argmax(-1, keepdim=True) if cfg.greedy else draw(probs)), probs


def verify(model, tokens, input_pos, cfg):
    """The target's forward over the last token and the K proposed ones, (1, K + 1) at positions input_pos (always
    K + 1 of them, so it compiles to one graph): its distributions (K + 1, V) for each next token."""
    return token_probs(model(tokens, input_pos)[0], cfg)


def accept_draft(target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, greedy: bool = False):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for N independent proposals at once.
    draft_tokens (N, K) were drawn from draft_probs (N, K, V); target_probs (N, K + 1, V) are the target's
    distributions at the same positions and one more. Token j is accepted with probability min(1, p_j / q_j) while
    all before it were; at the first rejection n the replacement is drawn from max(0, p_n - q_n) normalised, and
    after K acceptances the bonus token from p_K. What comes out is distributed exactly as the target's samples.
    greedy: the distributions are one-hot, so the draw is an argmax. Returns (accepted count n (N,), the token
    after the accepted ones (N,))."""
    K = draft_tokens.shape[1]
    p = target_probs[:, :K].gather(-1, draft_tokens[..., None])[..., 0]
    q = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    accepted = torch.rand_like(p) * q < p  # u < p / q without a division (q > 0: the draft drew the token)
    n = accepted.long().cumprod(-1).sum(-1)  # the leading run of acceptances
    rows = torch.arange(n.shape[0], device=n.device)
    p_n = target_probs[rows, n]
    # q is zero after the last draft token, so the same residual is the bonus distribution p_K
    residual = (p_n - F.pad(draft_probs, (0, 0, 0, 1))[rows, n]).clamp(min=0)
    # rounding can leave no residual mass where p and q (nearly) coincide; p itself is then what remains
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return n, (residual.argmax(-1) if greedy else draw(residual)[:, 0])


class PromptLookup:
    """Draft-free proposals (prompt lookup decoding): the tokens that followed the most recent earlier occurrence of
    the last n tokens of prompt + output. Every n-gram's latest follower is indexed as tokens arrive."""

    def __init__(self, n: int, tokens: list):
        self.n, self.tokens, self.follower = n, [], {}
        self.extend(tokens)

    def extend(self, tokens: list):
        for t in tokens:
            i = len(self.tokens)  # t follows the n-gram that ends just before it
            self.tokens.append(t)
            if i >= self.n:
                self.follower[tuple(self.tokens[i - self.n : i])] = i

    def propose(self, k: int) -> list | None:
        """k token ids, or None if the last n tokens occurred nowhere before. A match near the end has fewer than k
        followers; the repetition it implies continues them periodically (the verify step always takes k)."""
        i = self.follower.get(tuple(self.tokens[-self.n :]))
        if i is None:
            return None
        span = self.tokens[i : i + k]
        return (span * -(-k // len(span)))[:k]


def check_speculation(batch_size: int, sampling: SamplingConfig, speculate_k: int, prompt_lookup: int = 0):
    if batch_size != 1:
        raise ValueError(f"speculative decoding needs batch size 1, not {batch_size}")
    if sampling.penalized:  # they would change the target's distribution within a verified block
        raise ValueError("repetition/frequency/presence penalties are not supported with speculative decoding")
    if speculate_k < 1 or prompt_lookup < 0:
        raise ValueError("speculate_k must be >= 1 and prompt_lookup >= 0")


def check_draft(draft_model: Transformer, model: Transformer) -> Transformer:
    # Only the vocabulary must match; any draft keeps the output exact, a poor one only accepts less.
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size} tokens) differs from the "
                         f"target's ({model.config.vocab_size}): the draft must share the target's tokenizer")
    return draft_model


def compile_speculative_steps(device: str, compile_prefill: bool = False):
    """(prefill, decode, draft_step, verify) for speculative_generate(), each of fixed shapes (compile_static)."""
    return *compile_steps(device, compile_prefill), compile_static(draft_step, device), compile_static(verify, device)


@torch.inference_mode()
def speculative_generate(model: Transformer, prompts: list, max_new_tokens: int,
                         sampling: SamplingConfig = SamplingConfig(), eos_ids=(), *, draft_model: Transformer = None,
                         prompt_lookup: int = 0, speculate_k: int = 5, max_seq_len: int = 0,
                         steps=(prefill, decode_one_token, draft_step, verify), on_token=None) -> GenerationResult:
    """generate() for one prompt, with speculative decoding: a draft model (draft_model) or prompt lookup (n-gram
    length prompt_lookup) proposes speculate_k tokens, the target scores them in one forward pass and accept_draft
    keeps a prefix. The output is distributed exactly as generate()'s (greedy: the same tokens, up to rounding
    differences between a (K + 1)-token and a 1-token forward). Prompt lookup without a match, and the last tokens
    when the caches have no room for K more, take a plain decode step. result.accepted: per verify step."""
    prefill_fn, decode_fn, draft_fn, verify_fn = steps
    K = speculate_k
    check_speculation(len(prompts), sampling, K, prompt_lookup)
    if (draft_model is None) == (not prompt_lookup):
        raise ValueError("speculative decoding needs one of a draft model and prompt lookup")
    if draft_model is not None:
        check_draft(draft_model, model)
    prompt, device = list(prompts[0]), model.output.weight.device
    T, context = len(prompt), model.config.max_seq_len
    if T == 0:
        raise ValueError("empty prompt")
    if T >= context or (draft_model is not None and T >= draft_model.config.max_seq_len):
        raise ValueError(f"prompt of {T} tokens does not fit the context of the target or the draft model")
    max_new_tokens = min(max_new_tokens, context - T)
    cache_len = min(context, max(max_seq_len, T + max_new_tokens + K))  # a verify step writes K past the last token
    model.setup_caches(1, cache_len)
    if draft_model is not None:
        cache_len = min(cache_len, draft_model.config.max_seq_len)
        draft_model.setup_caches(1, cache_len)

    t0 = time.perf_counter()
    tokens, input_pos = torch.tensor([prompt], device=device), torch.arange(T, device=device)
    token = prefill_fn(model, tokens, input_pos, None, sampling, None, None).clone()  # (1, 1): not in the caches yet
    if draft_model is not None:
        prefill_fn(draft_model, tokens, input_pos, None, sampling, None, None)
    out, eos = [token.item()], set(eos_ids)
    if on_token:
        on_token(0, token)
    ttft = time.perf_counter() - t0

    lookup = PromptLookup(prompt_lookup, prompt + out) if prompt_lookup else None
    accepted = []
    while len(out) < max_new_tokens and out[-1] not in eos:
        pos = T + len(out) - 1  # the cache position of `token`
        proposal = lookup.propose(K) if lookup else None
        if pos + K >= cache_len or (lookup and proposal is None):
            token = decode_fn(model, token, torch.arange(pos, pos + 1, device=device), None, sampling, None, None)
            token = token.clone()
            new = [token.item()]
        else:
            if lookup:
                draft_tokens = torch.tensor([proposal], device=device)
                draft_probs = F.one_hot(draft_tokens, model.config.vocab_size).float()  # proposed for certain
            else:
                drafted, probs, d = [], [], token
                for j in range(K):  # positions come from arange, not a host tensor: no sync between the steps
                    d, q = draft_fn(draft_model, d, torch.arange(pos + j, pos + j + 1, device=device), sampling)
                    d, q = d.clone(), q.clone()
                    drafted.append(d)
                    probs.append(q)
                draft_tokens, draft_probs = torch.cat(drafted, 1), torch.stack(probs, 1)
            target_probs = verify_fn(model, torch.cat([token, draft_tokens], 1),
                                     torch.arange(pos, pos + K + 1, device=device), sampling).clone()
            n, next_token = accept_draft(target_probs[None], draft_probs, draft_tokens, sampling.greedy)
            *proposed, last, n = torch.cat([draft_tokens[0], next_token, n]).tolist()  # the step's one host sync
            if n == K and draft_model is not None:  # the draft has not consumed its own last token (d) yet
                draft_fn(draft_model, d, torch.arange(pos + K, pos + K + 1, device=device), sampling)
            token, new = next_token.view(1, 1), proposed[:n] + [last]
            accepted.append(n)
        new = new[: max_new_tokens - len(out)]
        stop = next((j for j, t in enumerate(new) if t in eos), None)
        new = new if stop is None else new[: stop + 1]
        for t in new:
            if on_token:
                on_token(len(out), torch.tensor([[t]]))
            out.append(t)
        if lookup:
            lookup.extend(new)
    _sync(device)
    decode_seconds = time.perf_counter() - t0 - ttft
    # decode_steps: the tokens after the first, so that decode_tokens_per_sec stays tokens per second
    return GenerationResult([out], [T], ttft, decode_seconds, len(out) - 1, [out[-1] in eos], accepted)


def acceptance_stats(accepted: list, speculate_k: int) -> dict:
    """How many draft tokens each verify step accepted (histogram over 0..K), their mean, the fraction of all
    proposed tokens accepted, and the tokens each verify step produced on average (accepted + 1)."""
    steps = len(accepted)
    mean = sum(accepted) / steps if steps else 0.0
    return {"acceptance_histogram": [accepted.count(i) for i in range(speculate_k + 1)], "verify_steps": steps,
            "mean_accepted": mean, "acceptance_rate": mean / speculate_k,
            "tokens_per_verify": mean + 1 if steps else 0.0}


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate text with a Llama-family model.")
    p.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth"))
    p.add_argument("--tokenizer_path", type=Path, help="default: tokenizer.model beside the checkpoint")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch of different prompts")
    p.add_argument("--prompt_file", type=Path, help="one prompt per line")
    p.add_argument("--interactive", action="store_true", help="chat using the tokenizer's chat template")
    p.add_argument("--system", help="system prompt for --interactive")
    p.add_argument("--num_samples", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--batch_size", type=int, help="default: the number of prompts; prompts are repeated to fill it")
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
    p.add_argument("--draft_checkpoint_path", type=Path, help="speculative decoding with this draft model (same "
                   "tokenizer: a smaller model or a quantized copy of the target)")
    p.add_argument("--prompt_lookup", type=int, metavar="N", help="speculative decoding without a draft model: "
                   "propose what followed the last earlier occurrence of the last N tokens")
    p.add_argument("--speculate_k", type=int, help="tokens proposed per target forward pass (default 5)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16")
    p.add_argument("--metrics_json", type=Path, help="write per-sample and mean metrics here")
    p.add_argument("--profile", type=Path, help="write a torch.profiler trace of the last sample here")
    return p


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise FileNotFoundError(f"prompt file not found: {args.prompt_file}")
        prompts += [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    prompts = prompts or ["Hello, my name is"]
    batch_size = len(prompts) if args.batch_size is None else args.batch_size
    if batch_size < 1 or batch_size % len(prompts):
        raise ValueError(f"--batch_size {batch_size} is not a multiple of the {len(prompts)} prompts given")
    return prompts * (batch_size // len(prompts))


def speculative_options(args, sampling: SamplingConfig, batch_size: int) -> dict:
    """The speculative_generate() arguments of --prompt_lookup / --speculate_k ({}: plain decoding), checked before
    anything is loaded; run() adds the draft model."""
    if not args.draft_checkpoint_path and args.prompt_lookup is None:
        if args.speculate_k is not None:
            raise ValueError("--speculate_k needs --draft_checkpoint_path or --prompt_lookup")
        return {}
    if args.draft_checkpoint_path and args.prompt_lookup is not None:
        raise ValueError("choose one of --draft_checkpoint_path and --prompt_lookup")
    if args.interactive:
        raise ValueError("speculative decoding does not support --interactive")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise ValueError("--prompt_lookup must be >= 1")
    spec = {"speculate_k": 5 if args.speculate_k is None else args.speculate_k,
            "prompt_lookup": args.prompt_lookup or 0}
    check_speculation(batch_size, sampling, spec["speculate_k"])
    return spec


def atomic_save(obj, path: Path, save=torch.save):
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written file there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj):
    atomic_save(obj, path, save=lambda o, p: Path(p).write_text(json.dumps(o, indent=2) + "\n"))


def interactive_chat(model, tokenizer, sampling, args, steps):
    """Keeps the whole conversation in the KV cache; each turn prefills only its new tokens."""
    max_seq = min(args.max_seq_length or model.config.max_seq_len, model.config.max_seq_len)
    model.setup_caches(1, max_seq)
    pos, pending, first = 0, [], True  # pending: the last sampled token, not yet in the cache
    print(f"Chat ({max_seq}-token context). Empty line or Ctrl-D to quit.", flush=True)
    while True:
        try:
            user = input("\nUser: ").strip()
        except EOFError:
            break
        if not user:
            break
        turn = pending + tokenizer.encode_chat_turn(user, args.system if first else None, first=first)
        if pos + len(turn) + 1 >= max_seq:
            print(f"[context full: {pos} of {max_seq} tokens used; starting a new conversation]", flush=True)
            pos, pending, first = 0, [], True
            turn = tokenizer.encode_chat_turn(user, args.system, first=True)
            if len(turn) + 1 >= max_seq:
                print("[message too long for the context]", flush=True)
                continue
        stream = StreamDecoder(tokenizer)
        print("Assistant: ", end="", flush=True)

        def show(step, token):
            t = token[0, 0].item()
            if t not in tokenizer.eos_ids:
                print(stream.push([t]), end="", flush=True)

        result = generate(model, [turn], min(args.max_new_tokens, max_seq - pos - len(turn)), sampling,
                          tokenizer.eos_ids, start_pos=pos, max_seq_len=max_seq, steps=steps, on_token=show)
        print(stream.flush(), flush=True)
        reply = result.tokens[0]
        pos += len(turn) + len(reply) - 1
        # The last sampled token is not in the cache yet; close an unfinished reply with the end-of-turn id.
        pending = [reply[-1]] + ([] if result.stopped[0] else [tokenizer.eos_ids[-1]])
        first = False


def run(args) -> int:
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                              args.frequency_penalty, args.presence_penalty)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max_new_tokens and --num_samples must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    args.device = tp.maybe_init_dist(args.device)  # under torchrun: a process group, and this rank's GPU
    tensor_parallel = tp.world_size() > 1
    if tensor_parallel and args.interactive:
        raise ValueError("--interactive does not run under torchrun (tensor parallelism): only rank 0 has a terminal")
    if tensor_parallel and args.seed is None:  # every rank must draw the same random numbers to sample alike
        args.seed = tp.shared_seed()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    texts = [] if args.interactive else read_prompts(args)
    spec = speculative_options(args, sampling, len(texts))
    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, args.device, PRECISIONS[args.precision], tensor_parallel)
    if args.draft_checkpoint_path:
        # under torchrun the draft is sharded like the target: each rank streams half of it too
        draft = load_model(args.draft_checkpoint_path, args.device, PRECISIONS[args.precision], tensor_parallel)
        spec["draft_model"] = check_draft(draft, model)
    tokenizer = load_tokenizer(args.tokenizer_path or args.checkpoint_path.parent / "tokenizer.model")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}:"
                         " wrong --tokenizer_path?")
    prompts = [tokenizer.encode(t) for t in texts]
    longest = max(map(len, prompts), default=0)
    if longest >= model.config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens does not fit the model's context of {model.config.max_seq_len}")
    print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    if spec:
        gen = functools.partial(speculative_generate, **spec)
        steps = compile_speculative_steps(args.device, args.compile_prefill) if args.compile else \
            (prefill, decode_one_token, draft_step, verify)
    else:
        gen = generate
        steps = compile_steps(args.device, args.compile_prefill) if args.compile else (prefill, decode_one_token)
    if args.interactive:
        interactive_chat(model, tokenizer, sampling, args, steps)
        return 0

    eos_ids = () if args.ignore_eos else tokenizer.eos_ids
    wbytes = weight_bytes(model)
    compile_seconds = 0.0
    if args.compile:  # compile (and warm up) outside the measured samples
        t0 = time.perf_counter()
        gen(model, prompts, args.max_new_tokens, sampling, eos_ids, max_seq_len=args.max_seq_length, steps=steps)
        compile_seconds = time.perf_counter() - t0
        print(f"Compilation time: {compile_seconds:.2f} seconds", file=sys.stderr)

    samples = []
    for i in range(args.num_samples):
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

        if stream:  # the prompt primes the decoder, so the first new word keeps its leading space
            stream.push(prompts[0])
            print(texts[0], end="", flush=True)
        with prof:
            result = gen(model, prompts, args.max_new_tokens, sampling, eos_ids,
                         max_seq_len=args.max_seq_length, steps=steps, on_token=show if stream else None)
        if profiling:
            prof.export_chrome_trace(str(args.profile))
        if stream:
            print(stream.flush())
        else:
            for text, prompt, row in zip(texts, prompts, result.tokens):
                new = [t for t in row if t not in eos_ids]
                print(f"--- {text}{tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)):]}")
        m = {"time_to_first_token_s": result.time_to_first_token, "decode_tokens_per_sec": result.decode_tokens_per_sec,
             "total_tokens_per_sec": result.decode_tokens_per_sec * len(prompts),
             "bandwidth_gbps": wbytes * result.decode_tokens_per_sec / 1e9,
             "new_tokens": [len(r) for r in result.tokens], "prompt_tokens": result.prompt_tokens}
        samples.append(m)
        print(f"[sample {i}] time to first token {m['time_to_first_token_s'] * 1000:.1f} ms, "
              f"{m['decode_tokens_per_sec']:.2f} tokens/s per sequence, {m['bandwidth_gbps']:.2f} GB/s", file=sys.stderr)
        if spec:
            m |= {"accepted": result.accepted, **acceptance_stats(result.accepted, spec["speculate_k"])}
            print(f"[sample {i}] accepted per verify step: mean {m['mean_accepted']:.2f} of {spec['speculate_k']}, "
                  f"histogram {m['acceptance_histogram']}", file=sys.stderr)

    mean = {k: sum(s[k] for s in samples) / len(samples) for k in
            ("time_to_first_token_s", "decode_tokens_per_sec", "total_tokens_per_sec", "bandwidth_gbps")}
    summary = {**mean, "peak_memory_bytes": peak_memory_bytes(args.device), "compile_seconds": compile_seconds,
               "weight_bytes": wbytes, "batch_size": len(prompts), "device": args.device,
               "precision": args.precision, "samples": samples, "sampling": asdict(sampling),
               "world_size": tp.world_size()}  # under tensor parallelism weight_bytes and bandwidth are per rank
    print(f"Average: {mean['decode_tokens_per_sec']:.2f} tokens/s per sequence, "
          f"{mean['bandwidth_gbps']:.2f} GB/s{' per rank' if tensor_parallel else ''}, "
          f"time to first token {mean['time_to_first_token_s'] * 1000:.1f} ms, "
          f"peak memory {summary['peak_memory_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    if spec:
        stats = acceptance_stats([n for s in samples for n in s["accepted"]], spec["speculate_k"])
        summary["speculative"] = {"draft": str(args.draft_checkpoint_path or ""),
                                  "prompt_lookup": spec["prompt_lookup"], "speculate_k": spec["speculate_k"], **stats}
        print(f"Speculative: {stats['mean_accepted']:.2f} of {spec['speculate_k']} proposed tokens accepted per verify "
              f"step ({stats['acceptance_rate']:.0%}), histogram {stats['acceptance_histogram']}", file=sys.stderr)
    if args.metrics_json and tp.rank() == 0:
        write_json(args.metrics_json, summary)
    return 0


def main(argv=None):
    cli_main(run, build_parser().parse_args(argv))


def cli_main(run, args):
    """Exit with run(args)'s code; a user mistake (a ValueError, FileNotFoundError or TokenizerError) exits with one
    "error: ..." line instead of a traceback. Under torchrun only rank 0 prints; errors are reported by every rank,
    and the process group is torn down however the run ends."""
    try:
        with tp.rank0_output():
            code = run(args)
        sys.exit(code)
    except (FileNotFoundError, ValueError, TokenizerError) as e:  # user mistakes: one line, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        tp.destroy_dist()


if __name__ == "__main__":
    main()
