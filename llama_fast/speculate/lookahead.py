"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding"):
speculation without a draft model, from the model's own Jacobi iterations and an n-gram pool.

    out = lookahead_generate(model, [prompt], 100, SamplingConfig(temperature=0), eos_ids,
                             lookahead=LookaheadConfig(window=4, ngram=3, guesses=2), steps=make_steps("cpu", True))

Each step is one forward of fixed length L = (N - 1)(W + G) over the static KV cache, with two branches that do not
see each other (t: the position of the last accepted token, not yet in the cache; K = N - 1):
- lookahead: a window of K levels x W columns of guesses, level l column c at position t + l + c; level 0 column 0
  is the last accepted token itself. Column c's tokens see level 0 up to column c, then their own column's levels
  up to their own: one token per position from t on. The top level's outputs are the next Jacobi iteration's guesses;
  a column's K levels and its new guess are an n-gram the model wrote token by token, which goes into the pool; the
  window then drops its bottom level.
- verification: G n-grams from the pool that start with the last accepted token, their K tokens at positions
  t + 1 .. t + K, each seeing the cache, the last accepted token and its own n-gram's earlier tokens.

Acceptance: the token after the last accepted one is drawn from its row (argmax when greedy); while some candidate
continues with exactly that token, the next token is drawn from that candidate's row. Every token is drawn from the
target's distribution given exactly the tokens before it, so the output is distributed as plain sampling. (This is
SpecInfer's multi-candidate rejection rule for proposals made with certainty: accepting candidate c with probability
p(c), else moving on with c's probability removed, picks each candidate token with probability p(c) and any other
token with probability p(x), as one draw from p does.) Up to K accepted tokens and the one after them per step; the
accepted candidate's keys and values are copied to their positions in the cache.

The pool is filled from the prompt and the generated text as well (every n-gram, so prompt lookup is one of its
sources) and from the Jacobi trajectories; it keeps up to G continuations per first token, the most recent.
"""
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from decoding import GenerationResult, Steps
from llama_fast.speculate.speculative import speculative_generate
from model import Transformer
from sampling import SamplingConfig, sample


@dataclass(frozen=True)
class LookaheadConfig:
    window: int = 4  # W: Jacobi guesses per level
    ngram: int = 3  # N: n-gram length; the window has N - 1 levels, a candidate N - 1 tokens
    guesses: int = 2  # G: candidates verified per step (and continuations kept per first token)

    def __post_init__(self):
        for name, least in (("window", 1), ("ngram", 2), ("guesses", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"lookahead {name} must be >= {least}")

    @property
    def length(self) -> int:  # tokens in each step's forward
        return (self.ngram - 1) * (self.window + self.guesses)


# The defaults by device type, from the cost of a step's L-token forward against a 1-token one (BENCHMARKS.md,
# "Lookahead decoding"): on a 2-core CPU L = 12 costs 1.05x (stories110M) to 1.17x (tinyllama) a 1-token step, L = 36
# 1.8-2.5x, so the window stays small; a GPU has compute to spare (the paper's W = 15, N = 5, G = 15 for 7B).
DEFAULTS = {"cpu": LookaheadConfig(4, 3, 2), "cuda": LookaheadConfig(15, 5, 15)}


def lookahead_config(device, window: int | None = None, ngram: int | None = None,
                     guesses: int | None = None) -> LookaheadConfig:
    """The settings given, the device's defaults for those that are not (None)."""
    default = DEFAULTS.get(torch.device(device).type, DEFAULTS["cpu"])
    return LookaheadConfig(default.window if window is None else window, default.ngram if ngram is None else ngram,
                           default.guesses if guesses is None else guesses)


def lookahead_stats(accepted: list, pool_hits: int, cfg: LookaheadConfig) -> dict:
    """Over lookahead steps with these accepted candidate-token counts: tokens each step produced (mean and histogram
    over 1..N) and how many steps had candidates in the pool."""
    steps = len(accepted)
    return {"lookahead_steps": steps, "tokens_per_step": (sum(accepted) / steps + 1) if steps else 0.0,
            "tokens_per_step_histogram": [accepted.count(n - 1) for n in range(1, cfg.ngram + 1)],
            "pool_hits": pool_hits}


def candidate_row(cfg: LookaheadConfig, g: int, j: int) -> int:
    """Row of candidate g's j-th token (row 0 is the last accepted token)."""
    return 1 + g * (cfg.ngram - 1) + j


def window_row(cfg: LookaheadConfig, level: int, col: int) -> int:
    """Row of the lookahead window's level `level`, column `col` (level 0 column 0 is row 0)."""
    if level == col == 0:
        return 0
    base = 1 + cfg.guesses * (cfg.ngram - 1)
    return base + col - 1 if level == 0 else base + cfg.window - 1 + (level - 1) * cfg.window + col


def layout(cfg: LookaheadConfig) -> tuple[Tensor, Tensor]:
    """The step's attention pattern tree (L, L) bool (row i sees row j) and each row's position after t (L,)."""
    K, L = cfg.ngram - 1, cfg.length
    tree, offsets = torch.zeros(L, L, dtype=torch.bool), torch.zeros(L, dtype=torch.long)
    paths = {0: [0]}
    for g in range(cfg.guesses):
        for j in range(K):
            paths[candidate_row(cfg, g, j)] = [0] + [candidate_row(cfg, g, i) for i in range(j + 1)]
    for level in range(K):
        for c in range(cfg.window):
            paths[window_row(cfg, level, c)] = ([window_row(cfg, 0, i) for i in range(c + 1)] +
                                                [window_row(cfg, m, c) for m in range(1, level + 1)])
    for row, path in paths.items():
        tree[row, path] = True
        offsets[row] = len(path) - 1  # one token per position from t on: the path's length is the position
    return tree, offsets


class NgramPool:
    """N-grams keyed by their first token: up to `size` continuations (N - 1 tokens) per key, the most recently
    added last; adding one already there moves it last, and a new one beyond `size` drops the oldest."""

    def __init__(self, n: int, size: int):
        self.n, self.size, self.table = n, size, {}

    def add(self, ngram):
        continuations = self.table.setdefault(ngram[0], [])
        rest = tuple(ngram[1:])
        if rest in continuations:
            continuations.remove(rest)
        elif len(continuations) == self.size:
            continuations.pop(0)
        continuations.append(rest)

    def add_text(self, tokens: list, last: int | None = None):
        """Every n-gram of tokens, or only those ending in its last `last` tokens."""
        first = 0 if last is None else max(0, len(tokens) - last - self.n + 1)
        for i in range(first, len(tokens) - self.n + 1):
            self.add(tokens[i : i + self.n])

    def get(self, token: int) -> list:
        return self.table.get(token, [])


def accept(outs: list, candidates: list, cfg: LookaheadConfig) -> tuple[list, int | None]:
    """The step's new tokens from its outputs (the token drawn after each row): the one after the last accepted
    token, then while a candidate carries on with the token just drawn, the token drawn after it on that candidate's
    row. Returns (new tokens, the candidate whose rows gave the accepted ones or None)."""
    new, alive, chosen = [outs[0]], range(len(candidates)), None
    for j in range(cfg.ngram - 1):
        alive = [g for g in alive if candidates[g][j] == new[-1]]
        if not alive:
            break
        chosen = alive[0]
        new.append(outs[candidate_row(cfg, chosen, j)])
    return new, chosen


def lookahead_step(model, tokens, start, offsets, tree, n_verify, cfg):
    """Lookahead decoding's one forward: tokens (1, L) written at cache slots start..start+L-1 (start: (1,)) at
    positions start + offsets (L,), each attending to the cache before start and to the new tokens tree (L, L)
    allows. Returns (L,) the token after each: drawn as sample() draws for the first n_verify (the last accepted
    token and the verification branch), the argmax for the rest (the lookahead branch's guesses)."""
    slots = start + torch.arange(tokens.shape[1], device=tokens.device)
    mask = tree_mask(model, tree, offsets, start)
    logits = model(tokens, slots, mask=mask, positions=start + offsets)[0]
    return torch.cat([sample(logits[:n_verify], cfg)[:, 0], logits[n_verify:].argmax(-1)])


def tree_mask(model: Transformer, tree: Tensor, offsets: Tensor, start: Tensor) -> Tensor:
    """The forward's mask (1, T, cache_len) for T tokens written at cache slots start..start+T-1 (start: (1,)) whose
    positions are start + offsets (T,): each sees every cached slot before start and the new tokens that tree
    (T, T) allows it, within the sliding window if the model has one (by position, not slot)."""
    T, key = tree.shape[0], torch.arange(model.cache_len, device=tree.device)
    rel = (key - start).clamp(0, T - 1)  # a key slot's index among the new tokens
    new = (key >= start) & (key < start + T)
    mask = (key < start)[None] | (new[None] & tree[:, rel])
    if model.config.sliding_window:
        key_pos = torch.where(new, start + offsets[rel], key)
        mask = mask & (key_pos[None] > (start + offsets)[:, None] - model.config.sliding_window)
    return mask[None]


def copy_cache_slots(model: Transformer, src: Tensor, dst: Tensor):
    """Every layer's keys and values at static-cache slots src copied to slots dst (an accepted guess's): every
    buffer of the cache, which holds slots at dim 2 (keys and values, and an int8 cache's scales)."""
    for layer in model.layers:
        for buffer in layer.attention.kv_cache.buffers():
            buffer[:, :, dst] = buffer[:, :, src]


class Lookahead:
    """Lookahead decoding as a proposer of speculative_generate's loop (speculative.py): the window of guesses, the
    n-gram pool, and each step's inputs and bookkeeping for one sequence."""
    method = "lookahead decoding"

    def __init__(self, cfg: LookaheadConfig):
        self.cfg = cfg

    def extra(self, k: int) -> int:  # a step writes L slots from the last token's
        return self.cfg.length

    def start(self, target: Transformer, prompt: list, cache_len: int, sampling: SamplingConfig, steps: Steps):
        cfg, K = self.cfg, self.cfg.ngram - 1
        self.device, self.cache_len, self.text, self.steps = target.output.weight.device, cache_len, list(prompt), 0
        self.pool_hits = 0
        self.tree, self.offsets = (t.to(self.device) for t in layout(cfg))
        self.n_verify = 1 + cfg.guesses * K
        self.pool = NgramPool(cfg.ngram, cfg.guesses)
        self.pool.add_text(self.text)
        rng = random.Random(0)  # the first guesses: prompt tokens (any guess keeps the output exact)
        self.window = [[rng.choice(self.text) for _ in range(cfg.window)] for _ in range(K)]

    def step(self, target: Transformer, token: Tensor, pos: int, k: int, sampling: SamplingConfig, steps: Steps):
        """One step after `token` (cache position pos), while the cache has room for its L tokens: forward,
        acceptance (the step's one host sync), the accepted candidate's keys and values moved to their positions,
        window and pool updated. Returns (the new tokens, how many came from a candidate)."""
        if pos + self.cfg.length > self.cache_len:
            return None
        token = self.text[-1]  # `token` itself, already on the host (accepted() keeps the text): no device sync
        cfg, K = self.cfg, self.cfg.ngram - 1
        candidates = self.pool.get(token)
        self.pool_hits += bool(candidates)
        padding = [(token,) * K] * (cfg.guesses - len(candidates))  # fixed length: unused rows, never accepted
        self.window[0][0] = token
        tokens = ([token] + [t for c in candidates + padding for t in c] + self.window[0][1:] +
                  [t for level in self.window[1:] for t in level])
        start = torch.tensor([pos], device=self.device)
        outs = steps.compiled(lookahead_step)(target, torch.tensor([tokens], device=self.device), start, self.offsets,
                                              self.tree, self.n_verify, sampling).tolist()
        new, chosen = accept(outs, candidates, cfg)
        if chosen is not None:
            moved = torch.arange(len(new) - 1, device=self.device)
            copy_cache_slots(target, pos + candidate_row(cfg, chosen, 0) + moved, pos + 1 + moved)
        self.advance([outs[window_row(cfg, K - 1, c)] for c in range(cfg.window)])
        return new, len(new) - 1

    def accepted(self, new: list, n: int):
        self.text += new
        self.pool.add_text(self.text, last=len(new))

    def advance(self, guesses: list):
        """The Jacobi iteration's new guesses become the top level; the columns' n-grams go into the pool once the
        window holds only the model's own guesses (after the first K - 1 steps)."""
        K = self.cfg.ngram - 1
        if self.steps >= K - 1:
            for c, guess in enumerate(guesses):
                self.pool.add([level[c] for level in self.window] + [guess])
        self.window = self.window[1:] + [guesses]
        self.steps += 1


def lookahead_generate(model: Transformer, prompts: list, max_new_tokens: int,
                       sampling: SamplingConfig = SamplingConfig(), eos_ids=(), *,
                       lookahead: LookaheadConfig = LookaheadConfig(), cache_len: int = 0, steps: Steps = Steps(),
                       on_token=None) -> GenerationResult:
    """generate() for one prompt with lookahead decoding (speculative_generate with a Lookahead): distributed
    exactly as generate()'s output (greedy: the same tokens, up to rounding differences between an L-token and a
    1-token forward). When the cache has no room for a step's L tokens, plain decode steps finish. result.accepted:
    the candidate tokens accepted at each lookahead step; result.pool_hits: the steps that had candidates."""
    return speculative_generate(model, prompts, max_new_tokens, sampling, eos_ids, proposer=Lookahead(lookahead),
                                speculate_k=lookahead.ngram - 1, cache_len=cache_len, steps=steps,
                                on_token=on_token)
