"""The serving engine: continuous batching over a paged KV cache, with prefix caching and preemption. No HTTP here
(serve.py puts it behind an OpenAI-compatible API); from Python:

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=16))
    done = engine.generate([prompt_ids, ...], max_tokens=100, sampling=SamplingConfig(temperature=0))
    print(done[0].text, done[0].finish_reason)

Split as nano-vllm splits it: the scheduler decides which requests run in a step and holds their KV blocks
(scheduler.py), the model runner lays the batch out and runs the forward pass (runner.py), the sampler draws every
row's token with one host sync (sampler.py), and the engine ties them together and handles the output: text,
stop strings, finishing. Each step() is one forward pass over a ragged batch: the next token of every running
request whose next token is known, and chunks of the prompts being read, within a budget of tokens per step.
"""
import contextlib
import functools
import itertools
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
from torch import Tensor

from llama_fast.quant.kv_cache import Int8PagedKVCache
from llama_fast.serving.grammar import Grammars
from llama_fast.serving.paged_cache import BlockPool, PagedKVCache
from llama_fast.serving.request import GREEDY, Request, check_lookup, check_request, n_logits
from llama_fast.serving.runner import ModelRunner, pool_tokens
from llama_fast.serving.sampler import logprobs_of, sample_rows, seeded_generator
from llama_fast.serving.scheduler import Scheduler
from llama_fast.serving.step_time import MIN_DECODE_SAMPLES, StepTimes
from llama_fast.speculate.speculative import PromptLookup
from model import Transformer
from sampling import SamplingConfig
from decoding import StreamDecoder

KV_CACHE_CLASSES = {"auto": PagedKVCache, "int8": Int8PagedKVCache}
# A speculating request whose last LOOKUP_WINDOW verifications accepted fewer than LOOKUP_MIN_ACCEPTED tokens each on
# average stops proposing: each proposed token costs about a prompt token's compute, which a miss wastes
LOOKUP_WINDOW, LOOKUP_MIN_ACCEPTED = 8, 0.5


class EngineFailure(RuntimeError):
    """The engine cannot go on (the device or the model fails whatever it computes): its server should exit."""


@dataclass
class EngineConfig:
    max_batch_size: int = 16  # requests decoded together
    block_size: int = 16  # tokens per KV block
    kv_cache_tokens: int = 0  # the pool's size in tokens; 0: from kv_cache_gb
    kv_cache_gb: float = 0.0  # the pool's size in memory; 0: max_batch_size full contexts, if memory allows
    # tokens one step computes, all rows together (the token budget; on a 2-core CPU 256 and 512 were no faster)
    max_num_batched_tokens: int = 128
    prefill_chunk: int = 0  # the most prompt tokens of one request one step computes; 0: the whole budget
    # a step with decoding rows gives prompt chunks (and drafts) only as many tokens as fit in this many milliseconds,
    # by the times of the steps run so far (scheduler.py, step_time.py); 0: 1.75x the decoding rows' own time, and
    # at least the prompt tokens the load brings (Scheduler.load_share); inf: no limit but the token budget
    itl_target_ms: float = 0.0
    prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto": the model's activations' dtype; "int8": int8 with a scale per vector
    prompt_lookup: int = 0  # requests speculate by prompt lookup with n-grams of this length unless they say (0: off)
    speculate_k: int = 5  # tokens prompt lookup proposes per step
    max_model_len: int = 0  # the longest context served, prompt and output; 0: the model's
    compile: bool = False  # torch.compile the forward pass (on CUDA, batch and block counts padded to powers of two)

    def __post_init__(self):
        if not isinstance(self.max_model_len, int) or self.max_model_len < 0:
            raise ValueError(f"max_model_len must be 0 (the model's context) or more, not {self.max_model_len!r}")
        for name in ("max_batch_size", "block_size", "max_num_batched_tokens", "prefill_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (name != "prefill_chunk"):
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        check_lookup(self.prompt_lookup, self.speculate_k)
        if self.max_num_batched_tokens < self.max_batch_size:  # every running request decodes in every step
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_batch_size ({self.max_batch_size})")
        if self.kv_cache_dtype not in KV_CACHE_CLASSES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_CLASSES)}, not "
                             f"{self.kv_cache_dtype!r}")
        if not (isinstance(self.itl_target_ms, (int, float)) and self.itl_target_ms >= 0):
            raise ValueError(f"itl_target_ms must be 0 (the default target), more, or inf, not "
                             f"{self.itl_target_ms!r}")
        if self.kv_cache_tokens < 0 or not self.kv_cache_gb >= 0:
            raise ValueError("kv_cache_tokens and kv_cache_gb must be >= 0")


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if config.max_model_len > model.config.max_seq_len:
            raise ValueError(f"max_model_len ({config.max_model_len}) is longer than the model's context "
                             f"({model.config.max_seq_len})")
        self.context = config.max_model_len or model.config.max_seq_len
        cache_class = KV_CACHE_CLASSES[config.kv_cache_dtype]
        pool_size = pool_tokens(model, config.max_batch_size, config.kv_cache_tokens, config.kv_cache_gb, cache_class,
                                self.context)
        self.runner = ModelRunner(model, config.block_size, pool_size, config.max_batch_size, config.compile,
                                  cache_class)
        self.device = self.runner.device
        self.stats = dict(requests_finished=0, requests_failed=0, preemptions=0, prefix_cache_hit_tokens=0,
                          prefill_tokens=0, generation_tokens=0, draft_tokens=0, accepted_draft_tokens=0, steps=0)
        pool = BlockPool(self.runner.n_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(pool, config.max_batch_size, config.max_num_batched_tokens,
                                   config.prefill_chunk or config.max_num_batched_tokens, self.stats,
                                   config.itl_target_ms / 1000 if config.itl_target_ms else None)
        self.inbox: list[Request] = []
        self.aborted: set[str] = set()
        self.lock = threading.Condition()

    # ------------------------------------------------------------------------------- from any thread

    def check(self, r: Request):
        """Raise ValueError (a client's mistake) if the request cannot be served."""
        pool = self.scheduler.pool
        check_request(r, self.model.config.vocab_size, self.context, (pool.n_blocks - 1) * pool.block_size,
                      self.tokenizer is not None)

    def add(self, r: Request):
        self.check(r)
        with self.lock:
            self.inbox.append(r)
            self.lock.notify()

    def abort(self, request_id: str):
        """Cancel a request (e.g. its client went away): it ends at the next step and its blocks are freed."""
        with self.lock:
            self.aborted.add(request_id)
            self.lock.notify()

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self.inbox)

    def wait_for_work(self, timeout: float):
        with self.lock:
            if not self.has_work():
                self.lock.wait(timeout)

    def generate(self, prompts: list, max_tokens: int, sampling: SamplingConfig = GREEDY, **options) -> list:
        """Complete every prompt (token ids) and return their Requests, finished; options as Request's."""
        requests = [Request(p, max_tokens, sampling, **options) for p in prompts]
        for r in requests:
            self.add(r)
        while any(r.finish_reason is None for r in requests):
            self.step()
        return requests

    def warm_up(self):
        """Run each kind of step once, so that a compiled forward pass has its graph for each before the first
        client (the graphs specialise on whether a group is empty, one or more): one prompt chunk, then one
        decoding row; two chunks, then two rows; one row beside a chunk, two rows beside two chunks; on CUDA, a
        decode step of every padded shape (ModelRunner.capture_decode_graphs). Then time_first_steps: the step
        times start again from steps timed without compiles, and the counters from zero."""
        self.generate([[1, 2]], 2)
        self.generate([[1, 2, 3], [1, 2, 3, 4]], 2)
        first = Request([1, 2, 3], 4)
        self.add(first)
        self.step()
        later = [Request(p, 2) for p in ([1, 2], [1, 2, 3], [1, 2, 3, 4])]
        self.add(later[0])
        self.step()
        self.add(later[1])
        self.add(later[2])
        while not all(r.finish_reason for r in (first, *later)):
            self.step()
        if self.runner.padded:  # CUDA: every decode shape's graph
            self.runner.capture_decode_graphs()
        self.time_first_steps()

    def time_first_steps(self):
        """Time a few steps, the compiles done, so that the scheduler has its first estimates (StepTimes) when the
        first clients come: without them a burst of requests at start-up would be bounded by the token budget alone
        until some step of decoding rows alone was timed. A row decoding alone, then beside a prompt read a block a
        step. The load the default target follows is the clients', not these, and the counters start from zero."""
        self.scheduler.times = StepTimes()
        bs = self.scheduler.pool.block_size
        alone = Request([1, 2, 3], min(MIN_DECODE_SAMPLES + 8, self.context - 3))
        self.add(alone)
        while len(alone.output) <= MIN_DECODE_SAMPLES and not alone.finish_reason:
            self.step()
        beside = Request([1] * max(2, min(4 * bs, self.context - 8)), 1)
        self.add(beside)
        while not (alone.finish_reason and beside.finish_reason):
            self.step()
        self.scheduler.admitted.clear()
        for key in self.stats:
            self.stats[key] = 0

    # ------------------------------------------------------------------------------- the engine's thread

    @torch.inference_mode()
    def step(self) -> bool:
        """One forward pass over what the scheduler chose (every running request's next token, chunks of prompts),
        then a token for each row whose prompt is read. Returns whether it did any work. A failure confined to some
        requests fails those (finish_reason "error") and the others go on; EngineFailure when the model itself
        fails (compute)."""
        self.runner.check_cache()
        self.take_inbox()
        rows = self.scheduler.schedule()
        if rows:
            self.compute(rows)
        self.stats["steps"] += 1
        return bool(rows)

    def take_inbox(self):
        with self.lock:
            new, self.inbox = self.inbox, []
            aborted, self.aborted = self.aborted, set()
        for r in new:
            r.generator = seeded_generator(r.seed, self.device)
            if self.tokenizer is not None:
                r.decoder = StreamDecoder(self.tokenizer)
            r.speculation = r.speculation or (self.config.prompt_lookup, self.config.speculate_k)
            if r.speculation[0] and r.plain_greedy:  # exact: verified against what decoding gives
                r.lookup = PromptLookup(r.speculation[0], r.prompt)
            if r.logit_bias:
                r.bias = (torch.tensor(list(r.logit_bias), device=self.device),
                          torch.tensor(list(r.logit_bias.values()), device=self.device))
            if r.sampling.penalized:
                V = self.model.config.vocab_size
                r.counts = torch.zeros(V, device=self.device)
                r.seen = torch.zeros(V, dtype=torch.bool, device=self.device)
                r.seen[torch.tensor(r.prompt, device=self.device)] = True
            self.scheduler.waiting.append(r)
        for r in [r for r in (*self.scheduler.running, *self.scheduler.waiting) if r.id in aborted]:
            self.finish(r, "abort", flush=False)

    def compute(self, rows: list[tuple[Request, int]]):
        """The step's forward pass; each row whose prompt is then read samples its next token. If the pass fails,
        each row is computed alone (its keys are written again, to the same slots), and those that fail alone are
        failed: one request cannot take the others down. If none succeeds and the model fails even a one-token
        pass of nobody's (runner.probe), the engine cannot go on: EngineFailure. The scheduler is told how long a
        step took (from the pass to the sampled tokens: what its decoding rows' clients wait)."""
        start, timed = time.perf_counter(), True
        try:
            logits = self.runner.forward(rows)
        except Exception as e:
            timed = False
            ok = []
            for row in rows if len(rows) > 1 else []:
                try:
                    ok.append((row, self.runner.forward([row])))
                except Exception as e_alone:
                    self.failed([row], e_alone)
            if not ok:
                self.failed(rows, e)
                try:
                    self.runner.probe()
                except Exception as broken:
                    raise EngineFailure(f"the model fails whatever it computes: {type(broken).__name__}: "
                                        f"{broken}") from broken
                return
            rows, logits = [row for row, _ in ok], torch.cat([x for _, x in ok])
        self.stats["prefill_tokens"] += sum(min(n, len(r.prompt) - r.n_computed) for r, n in rows
                                            if r.n_computed < len(r.prompt))
        decoding = sum(n == 1 or bool(r.draft) for r, n in rows)  # a row verifying a draft decodes a token too
        tokens = sum(n for _, n in rows)
        self.take_tokens(rows, logits)
        if timed:  # (a step whose rows were computed alone says nothing of a step's time)
            self.scheduler.times.observe(decoding, tokens - decoding, time.perf_counter() - start)

    def take_tokens(self, rows: list[tuple[Request, int]], logits: Tensor):
        """After the pass (logits: each row's last computed token's, every one of a row verifying a draft): a row
        verifying a draft keeps what verify() accepts; a row whose prompt is then read samples its next token."""
        ends = list(itertools.accumulate(n_logits(r, n) for r, n in rows))  # each row's logits end there
        greedy = logits.argmax(-1).tolist() if any(r.draft for r, _ in rows) else None  # one host sync for drafts
        done, accepted = [], {}
        for (r, n), end in zip(rows, ends):
            if r.draft:
                accepted[r] = self.verify(r, greedy[end - n:end])
            elif r.reads_prompt_logprobs:
                self.score_prompt(r, logits[end - n:end])
            done.append((r, len(accepted[r]) if r.draft else n))  # a draft's accepted tokens and the one before
        self.scheduler.computed(done)
        for r in accepted:
            r.draft = []
        ready = [i for i, (r, _) in enumerate(rows) if r.n_pending == 0 and r not in accepted]
        for r in [rows[i][0] for i in ready if rows[i][0].max_tokens == 0]:  # it only scored its prompt (echo)
            self.finish(r, "length")
        ready = [i for i in ready if rows[i][0].finish_reason is None]
        if ready:
            last = [ends[i] - 1 for i in ready]
            self.sample(logits if last == list(range(len(logits))) else logits[last], [rows[i][0] for i in ready])
        for r, tokens in accepted.items():
            for token in tokens:
                if r.finish_reason is None:
                    self.append(r, token)

    def verify(self, r: Request, predicted: list[int]) -> list[int]:
        """The tokens a row verifying its draft adds, given what greedy decoding predicts after its next token and
        after each drafted one: the longest run of the draft greedy decoding would have produced, and the token
        after it (its keys beyond are overwritten later). A request accepting too little stops drafting."""
        j = next((i for i, (d, p) in enumerate(zip(r.draft, predicted)) if d != p), len(r.draft))
        self.stats["draft_tokens"] += len(r.draft)
        self.stats["accepted_draft_tokens"] += j
        r.verified = [*r.verified[-LOOKUP_WINDOW + 1:], j]
        if len(r.verified) == LOOKUP_WINDOW and sum(r.verified) < LOOKUP_MIN_ACCEPTED * LOOKUP_WINDOW:
            r.lookup = None  # below break-even: it decodes plainly from now on
        return r.draft[:j] + [predicted[j]]

    def score_prompt(self, r: Request, logits: Tensor):
        """The logprobs of the prompt tokens that the logits (one after each token this step computes of r's
        prompt) predict; those already scored before a preemption are not scored again."""
        start, scored = r.n_computed, len(r.prompt_token_logprobs) + 1  # the first token has none
        targets = r.prompt[start + 1:start + 1 + len(logits)]
        if start + len(targets) >= scored:
            first = scored - start - 1
            r.prompt_token_logprobs += logprobs_of(logits[first:len(targets)], targets[first:], r.prompt_logprobs)

    def sample(self, logits: Tensor, rows: list[Request]):
        """Each row's next token (a row whose settings cannot be sampled fails alone), its logprobs if asked for
        (of the model's own logits: before logit_bias, penalties and temperature) and what it adds."""
        scored = [i for i, r in enumerate(rows) if r.logprobs is not None]
        raw = logits[scored] if scored else None
        if any(r.logit_bias or r.grammar for r in rows):
            logits = logits.clone()
            for i, r in enumerate(rows):
                if r.logit_bias:
                    logits[i].index_add_(0, *r.bias)
            self.constrain(logits, rows)
        try:
            tokens = sample_rows(logits, rows)
        except Exception:
            tokens = []
            for i, r in enumerate(rows):
                try:
                    tokens.append(sample_rows(logits[i:i + 1], [r])[0])
                except Exception as e:
                    self.failed([(r, 0)], e)
                    tokens.append(None)
        if scored:
            k = max(rows[i].logprobs for i in scored)
            for i, (lp, top) in zip(scored, logprobs_of(raw, [tokens[i] or 0 for i in scored], k)):
                rows[i].token_logprobs.append((lp, top[:rows[i].logprobs]))
        for r, token in zip(rows, tokens):
            if token is not None and r.finish_reason is None:  # (a row whose grammar failed has ended)
                try:
                    if r.grammar is not None and not r.grammar.accept(token):
                        raise RuntimeError("the grammar refused a token its own mask allowed")
                    self.append(r, token)
                except Exception as e:  # its stop strings, its text, its client's callback
                    self.failed([(r, 0)], e)

    def constrain(self, logits: Tensor, rows: list[Request]):
        """Structured output: each row with a grammar may only take the tokens it allows (the other logits -inf,
        in place); a row whose grammar allows nothing but the end before its JSON is whole fails: never an
        invalid output claimed complete."""
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        if not constrained:
            return
        allowed = self.grammars.masks([rows[i].grammar for i in constrained]).to(logits.device)
        where = torch.tensor(constrained, device=logits.device)
        logits[where] = logits[where].masked_fill(~allowed, float("-inf"))
        text = allowed.clone()
        text[:, list(self.tokenizer.eos_ids)] = False
        for i, goes_on in zip(constrained, text.any(-1).tolist()):
            if not goes_on and not rows[i].grammar.complete():  # (llguidance allows only the end when it is stuck)
                error = rows[i].grammar.error() or "no token can continue it"
                self.failed([(rows[i], 0)], RuntimeError(f"the structured output cannot go on: {error}"))

    @functools.cached_property
    def grammars(self) -> Grammars:
        """The tokenizer's vocabulary as structured output needs it (made on first use: 0.2-0.4 s)."""
        if self.tokenizer is None:
            raise ValueError("structured output needs the engine's tokenizer")
        return Grammars(self.tokenizer, self.model.config.vocab_size)

    def failed(self, rows: list[tuple[Request, int]], e: Exception):
        """Each row's request ends with finish_reason "error" and e as its error; its blocks are freed."""
        traceback.print_exception(e, file=sys.stderr)  # for whoever runs the server: the client gets one line
        for r, _ in rows:
            if r.finish_reason is None:
                r.error = f"{type(e).__name__}: {e}"
                with contextlib.suppress(Exception):  # a client whose callback failed fails again here
                    self.finish(r, "error", flush=False)
                self.stats["requests_failed"] += 1

    def append(self, r: Request, token: int):
        now = time.perf_counter()
        r.first_token_time = r.first_token_time or now
        r.tokens.append(token)
        if r.lookup is not None:
            r.lookup.extend([token])
        self.stats["generation_tokens"] += 1
        if r.counts is not None:
            r.counts[token] += 1
            r.seen[token] = True
        if token in r.eos_ids:
            return self.finish(r, "stop")
        stopped = False
        if r.decoder is not None:
            r.text += r.decoder.push([token])
            stopped = self.cut_at_stop(r)
        if stopped or len(r.output) >= r.max_tokens:
            return self.finish(r, "stop" if stopped else "length", flush=not stopped)
        if r.on_output:
            # hold back what could be the start of a stop string
            end = len(r.text) - max((k for s in r.stop for k in range(len(s), 0, -1) if r.text.endswith(s[:k])),
                                    default=0)
            r.on_output(r, r.text[r.sent:end], [token])
            r.sent = max(r.sent, end)

    @staticmethod
    def cut_at_stop(r: Request) -> bool:
        hits = [i for i in (r.text.find(s, max(0, r.sent - len(s))) for s in r.stop) if i >= 0]
        if hits:
            r.text = r.text[:min(hits)]
        return bool(hits)

    def finish(self, r: Request, reason: str, flush: bool = True):
        r.finish_reason = reason
        if r.decoder is not None and flush:  # a character still incomplete at the end
            r.text += r.decoder.flush()
            self.cut_at_stop(r)
        self.scheduler.remove(r)
        self.stats["requests_finished"] += 1
        if r.on_output:
            token = r.tokens[-1:] if reason != "abort" and len(r.tokens) > len(r.prompt) else []
            r.on_output(r, r.text[r.sent:], token)
            r.sent = len(r.text)

