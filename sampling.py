"""Sampling: turning a row of logits into the next token, without a host synchronisation.

Penalties (repetition, frequency, presence), then temperature, top-k, top-p and min-p, each on the renormalised
distribution; greedy when the temperature is 0. A new filter goes into logits_to_probs (and a field of
SamplingConfig), and every decoding path (plain, speculative, eval) uses it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
        for name, value in vars(self).items():  # NaN passes every comparison below, and inf is no setting either
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value}")
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


def draw(weights: Tensor, generator: torch.Generator | None = None, uniform: Tensor | None = None) -> Tensor:
    """(..., V) non-negative weights (not necessarily normalised) -> (..., 1) ids drawn in proportion to them,
    from the global random generator or the one given (a server request's own seed); uniform: the (..., 1) draws
    in [0, 1) to use instead (the server draws each row's from its own generator)."""
    # Inverse transform: one uniform number per row against the cumulative weights, in float64 so that a token of
    # tiny weight keeps its share; u in (0, total], so the first id whose cumulative weight reaches u has a weight
    # above 0. No host sync (torch.multinomial has one), and one random number per row where the exponential race
    # (argmax w / E, E ~ Exp(1)) took one per token: on a CPU that race cost ~0.5 ms per row of 32,000.
    cdf = weights.double().cumsum(-1)
    if uniform is None:
        uniform = torch.rand(*weights.shape[:-1], 1, generator=generator, dtype=torch.float64, device=weights.device)
    return torch.searchsorted(cdf, (1 - uniform) * cdf[..., -1:]).clamp_(max=weights.shape[-1] - 1)


def sample(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(B, V) float logits -> (B, 1) token ids, without a host synchronisation."""
    if cfg.greedy:
        return logits.argmax(-1, keepdim=True)
    return draw(logits_to_probs(logits, cfg))


def token_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """(..., V) logits -> the distribution sample() draws from: one-hot at the argmax when greedy, which turns
    accept_draft's rule into "accept while the draft's token is the target's argmax"."""
    if cfg.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return logits_to_probs(logits, cfg)
