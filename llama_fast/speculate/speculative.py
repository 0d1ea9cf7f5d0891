"""Speculative decoding: a proposer guesses the next K tokens, the target scores them all in one forward pass, and
accept_draft keeps a prefix so that the output is distributed exactly as the target's own samples.

    out = speculative_generate(target, [prompt], 100, SamplingConfig(temperature=0), eos_ids,
                               proposer=DraftModel(draft), speculate_k=5, steps=make_steps("cuda", compile=True))

One loop (speculative_generate) serves every proposer; a proposer is a small class with four methods:
    extra(k)                                           cache slots a step writes past the last token
    start(target, prompt, cache_len, sampling, steps)  once, before the target's prefill
    step(target, token, pos, k, sampling, steps) -> (new tokens, n accepted) or None (then a plain decode step)
                                                       one speculative step after `token` (1, 1) at cache `pos`
    accepted(new_tokens, n)   the tokens the loop kept, the first n of them accepted proposals (the first token
                              after the prompt and plain decode steps: n = 0)
DraftModel runs a smaller model (or a quantized copy of the target) and PromptLookup copies what followed the last
earlier occurrence of the latest n-gram (no model): both propose k tokens that the target verifies in one
(k + 1)-token forward (Verified.step). Lookahead (lookahead.py) guesses with the target itself and verifies its
own candidates in the same forward.
"""
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from decoding import GenerationResult, Steps, check_room, sync
from model import Transformer
from sampling import SamplingConfig, draw


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


# -------------------------------------------------------------------------------------------------- proposers

class Verified:
    """What DraftModel and PromptLookup share: a step proposes k tokens (their propose()) that the target verifies
    in one (k + 1)-token forward (verify_step), while the cache has room for them."""
    cache_len = 0

    def extra(self, k: int) -> int:
        return k

    def step(self, target, token: Tensor, pos: int, k: int, sampling: SamplingConfig, steps: Steps):
        proposal = self.propose(token, pos, k) if pos + k < self.cache_len else None
        if proposal is None:
            return None
        new, n = verify_step(target, token, pos, proposal, sampling, steps)
        return new, n


class DraftModel(Verified):
    """Proposals drawn from a draft model that shares the target's vocabulary, one draft decode step per token."""

    def __init__(self, model: Transformer):
        self.model = model

    def check(self, target: Transformer):
        # Only the vocabulary must match; any draft keeps the output exact, a poor one only accepts less.
        if self.model.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.model.config.vocab_size} tokens) differs from the "
                             f"target's ({target.config.vocab_size}): the draft must share the target's tokenizer")

    def start(self, target, prompt, cache_len, sampling, steps):
        self.check(target)
        if len(prompt) >= self.model.config.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the draft model's context")
        self.sampling, self.draft_step, self.last, self.cache_len = sampling, steps.draft, None, cache_len
        self.model.setup_caches(1, min(cache_len, self.model.config.max_seq_len))
        device = self.model.output.weight.device
        steps.prefill(self.model, torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device),
                      None, sampling, None, None)

    def propose(self, token: Tensor, pos: int, k: int):
        if pos + k >= self.model.cache_len:  # a draft with a shorter context than the target's: no room for k more
            return None
        drafted, probs, d = [], [], token
        for j in range(k):  # positions come from arange, not a host tensor: no sync between the steps
            d, q = self.draft_step(self.model, d, torch.arange(pos + j, pos + j + 1, device=token.device),
                                   self.sampling)
            d, q = d.clone(), q.clone()  # a CUDA graph's outputs are overwritten by its next run
            drafted.append(d)
            probs.append(q)
        self.last, self.pos, self.k = d, pos + k, k
        return torch.cat(drafted, 1), torch.stack(probs, 1)

    def accepted(self, new: list, n: int):
        if self.last is not None and n == self.k:
            # all k accepted: the draft has not consumed its own last token yet
            self.draft_step(self.model, self.last, torch.arange(self.pos, self.pos + 1, device=self.last.device),
                            self.sampling)
        self.last = None


class PromptLookup(Verified):
    """Draft-free proposals (prompt lookup decoding): the tokens that followed the most recent earlier occurrence of
    the last n tokens of prompt + output. Every n-gram's latest follower is indexed as tokens arrive."""

    def __init__(self, n: int, tokens=()):
        if n < 1:
            raise ValueError("prompt lookup needs n-grams of length >= 1")
        self.n, self.tokens, self.follower = n, [], {}
        self.extend(tokens)

    def extend(self, tokens: list):
        for t in tokens:
            i = len(self.tokens)  # t follows the n-gram that ends just before it
            self.tokens.append(t)
            if i >= self.n:
                self.follower[tuple(self.tokens[i - self.n : i])] = i

    def follow(self, k: int) -> list | None:
        """k token ids, or None if the last n tokens occurred nowhere before. A match near the end has fewer than k
        followers; the repetition it implies continues them periodically (the verify step always takes k)."""
        i = self.follower.get(tuple(self.tokens[-self.n :]))
        if i is None:
            return None
        span = self.tokens[i : i + k]
        return (span * -(-k // len(span)))[:k]

    def start(self, target, prompt, cache_len, sampling, steps):
        self.tokens, self.follower, self.vocab_size, self.cache_len = [], {}, target.config.vocab_size, cache_len
        self.extend(prompt)

    def propose(self, token: Tensor, pos: int, k: int):
        proposal = self.follow(k)
        if proposal is None:
            return None
        tokens = torch.tensor([proposal], device=token.device)
        return tokens, F.one_hot(tokens, self.vocab_size).float()  # proposed with certainty

    def accepted(self, new: list, n: int):
        self.extend(new)


# ----------------------------------------------------------------------------------------------- the loop

def check_speculation(batch_size: int, sampling: SamplingConfig, speculate_k: int,
                      method: str = "speculative decoding"):
    if batch_size != 1:
        raise ValueError(f"{method} needs batch size 1, not {batch_size}")
    if sampling.penalized:  # they would change the target's distribution within a verified block
        raise ValueError(f"repetition/frequency/presence penalties are not supported with {method}")
    if speculate_k < 1:
        raise ValueError("speculate_k must be >= 1")


def verify_step(model, token, pos, proposal, sampling, steps) -> tuple[list, int]:
    """The target scores `token` and the K proposed tokens at cache positions pos..pos+K; returns the step's new
    tokens (the accepted proposals and the token after them) and the accepted count."""
    draft_tokens, draft_probs = proposal
    K = draft_tokens.shape[1]
    target_probs = steps.verify(model, torch.cat([token, draft_tokens], 1),
                                torch.arange(pos, pos + K + 1, device=token.device), sampling).clone()
    n, next_token = accept_draft(target_probs[None], draft_probs, draft_tokens, sampling.greedy)
    *proposed, last, n = torch.cat([draft_tokens[0], next_token, n]).tolist()  # the step's one host sync
    return proposed[:n] + [last], n


@torch.inference_mode()
def speculative_generate(model: Transformer, prompts: list, max_new_tokens: int,
                         sampling: SamplingConfig = SamplingConfig(), eos_ids=(), *, proposer, speculate_k: int = 5,
                         cache_len: int = 0, steps: Steps = Steps(), on_token=None) -> GenerationResult:
    """generate() for one prompt, with speculative steps: `proposer` (DraftModel, PromptLookup, Lookahead) makes
    each step, up to speculate_k accepted tokens and the one after them. The output is distributed exactly as
    generate()'s (greedy: the same tokens, up to rounding differences between a several-token and a 1-token forward).
    Where the proposer has no step to offer (nothing to propose, no room left in the cache), a plain decode step.
    result.accepted: the accepted count of each speculative step; result.pool_hits: the proposer's, if it counts
    them (Lookahead)."""
    K = speculate_k
    check_speculation(len(prompts), sampling, K, getattr(proposer, "method", "speculative decoding"))
    prompt, max_new_tokens, cache_len = setup_one(model, prompts, max_new_tokens, cache_len, proposer.extra(K))
    T, device = len(prompt), model.output.weight.device

    t0 = time.perf_counter()
    proposer.start(model, prompt, cache_len, sampling, steps)
    token = steps.prefill(model, torch.tensor([prompt], device=device), torch.arange(T, device=device), None,
                          sampling, None, None).clone()  # (1, 1): not in the caches yet
    out, eos = [token.item()], set(eos_ids)
    proposer.accepted(out, 0)
    if on_token:
        on_token(0, token)
    ttft = time.perf_counter() - t0

    accepted = []
    while len(out) < max_new_tokens and out[-1] not in eos:
        pos = T + len(out) - 1  # the cache position of `token`
        speculated = proposer.step(model, token, pos, K, sampling, steps)
        if speculated is None:
            token = steps.decode(model, token, torch.arange(pos, pos + 1, device=device), None, sampling, None, None)
            new, n = [token.item()], 0
        else:
            new, n = speculated
            accepted.append(n)
        new = keep(new, max_new_tokens - len(out), eos)
        proposer.accepted(new, n)
        for t in new:
            if on_token:
                on_token(len(out), torch.tensor([[t]]))
            out.append(t)
        token = torch.tensor([[out[-1]]], device=device) if speculated else token.clone()
    sync(device)
    decode_seconds = time.perf_counter() - t0 - ttft
    return GenerationResult([out], [T], ttft, decode_seconds, len(out) - 1, [out[-1] in eos], accepted,
                            getattr(proposer, "pool_hits", 0))


def setup_one(model: Transformer, prompts: list, max_new_tokens: int, cache_len: int, extra: int):
    """For decoding one prompt with steps that write `extra` cache slots past the last token: (the prompt,
    max_new_tokens shortened to the model's context as generate() does, the KV cache length set up)."""
    prompt = list(prompts[0])
    max_new_tokens = check_room(model, [prompt], max_new_tokens, 0)
    cache_len = min(model.config.max_seq_len, max(cache_len, len(prompt) + max_new_tokens + extra))
    model.setup_caches(1, cache_len)
    return prompt, max_new_tokens, cache_len


def keep(new: list, room: int, eos: set) -> list:
    """The step's tokens that count: at most `room`, up to and including the first EOS."""
    new = new[:room]
    stop = next((j for j, t in enumerate(new) if t in eos), None)
    return new if stop is None else new[: stop + 1]


def acceptance_stats(accepted: list, speculate_k: int) -> dict:
    """How many draft tokens each verify step accepted (histogram over 0..K), their mean, the fraction of all
    proposed tokens accepted, and the tokens each verify step produced on average (accepted + 1)."""
    steps = len(accepted)
    mean = sum(accepted) / steps if steps else 0.0
    return {"acceptance_histogram": [accepted.count(i) for i in range(speculate_k + 1)], "verify_steps": steps,
            "mean_accepted": mean, "acceptance_rate": mean / speculate_k,
            "tokens_per_verify": mean + 1 if steps else 0.0}
