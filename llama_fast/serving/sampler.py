"""The next token of every row of a batch, each drawn with its request's own settings and random generator, with
one host sync for the whole batch (nano-vllm's Sampler, with per-request settings)."""
import random

import torch
from torch import Tensor

from llama_fast.serving.request import Request
from sampling import apply_penalties, draw, logits_to_probs


def sample_rows(logits: Tensor, rows: list[Request]) -> list[int]:
    """logits (B, V) float, row i of rows[i]: the tokens. Rows with the same settings are filtered together
    (penalties, temperature, top-k, top-p, min-p); a sampled row draws its uniform number (sampling.draw) from its
    own generator, so its token never depends on the other rows of the batch, and is what draw() would give it."""
    tokens = logits.argmax(-1)  # greedy rows without penalties: most of a batch, often
    groups = {}
    for i, r in enumerate(rows):
        if not r.sampling.greedy or r.sampling.penalized:
            groups.setdefault(r.sampling, []).append(i)
    for cfg, idx in groups.items():
        where = torch.tensor(idx, device=logits.device)
        group = logits[where]
        if cfg.penalized:
            seen, counts = (torch.stack([getattr(rows[i], name) for i in idx]) for name in ("seen", "counts"))
            group = apply_penalties(group, cfg, seen, counts)
        if cfg.greedy:
            tokens[where] = group.argmax(-1)
            continue
        uniform = torch.cat([torch.rand(1, 1, generator=rows[i].generator, dtype=torch.float64) for i in idx])
        tokens[where] = draw(logits_to_probs(group, cfg), uniform=uniform.to(logits.device))[:, 0]
    return tokens.tolist()


def logprobs_of(logits: Tensor, tokens: list[int], k: int) -> list[tuple[float, list]]:
    """For each row: (the log probability of its token, [(token, log probability)] of its k most likely), from the
    float32 log-softmax of the logits; one host sync for all rows."""
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    top = logprobs.topk(k, -1) if k else None
    alternatives = zip(top.indices.tolist(), top.values.tolist()) if k else [([], [])] * len(tokens)
    return [(lp, list(zip(ids, lps))) for lp, (ids, lps) in zip(chosen, alternatives)]


def seeded_generator(seed: int | None, device) -> torch.Generator:
    """A request's own random generator: seeded by its seed, else at random."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g
