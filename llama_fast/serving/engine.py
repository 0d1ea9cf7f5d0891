"""The serving engine: continuous batching over a paged KV cache, with prefix caching and preemption. No HTTP here
(serve.py puts it behind an OpenAI-compatible API); from Python:

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=16))
    done = engine.generate([prompt_ids, ...], max_tokens=100, sampling=SamplingConfig(temperature=0))
    print(done[0].text, done[0].finish_reason)

Split as nano-vllm splits it: the scheduler decides which requests run in a step and holds their KV blocks
(scheduler.py), the model runner lays the batch out and runs the forward pass (runner.py), the sampler draws every
row's token with one host sync (sampler.py), and the engine ties them together and handles the output: text,
stop strings, finishing. Each step() decodes one token for every running request whose next token is known, all in
one forward pass of shape (batch, 1), each row at its own position, then one chunk of one prompt.
"""
import random
import threading
import time
from dataclasses import dataclass

import torch

from llama_fast.serving.paged_cache import BlockPool
from llama_fast.serving.request import GREEDY, Request
from llama_fast.serving.runner import ModelRunner, pool_tokens
from llama_fast.serving.sampler import sample_rows
from llama_fast.serving.scheduler import Scheduler
from model import Transformer
from sampling import SamplingConfig
from tokenizer import StreamDecoder

SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class EngineConfig:
    max_batch_size: int = 16  # requests decoded together
    block_size: int = 16  # tokens per KV block
    kv_cache_tokens: int = 0  # the pool's size in tokens; 0: from kv_cache_gb
    kv_cache_gb: float = 0.0  # the pool's size in memory; 0: max_batch_size full contexts, if memory allows
    prefill_chunk: int = 256  # prompt tokens computed per step
    prefix_caching: bool = True
    compile: bool = False  # torch.compile the forward pass (on CUDA, batch and block counts padded to powers of two)

    def __post_init__(self):
        for name in ("max_batch_size", "block_size", "prefill_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if self.kv_cache_tokens < 0 or not self.kv_cache_gb >= 0:
            raise ValueError("kv_cache_tokens and kv_cache_gb must be >= 0")


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.context = model.config.max_seq_len
        pool_size = pool_tokens(model, config.max_batch_size, config.kv_cache_tokens, config.kv_cache_gb)
        self.runner = ModelRunner(model, config.block_size, pool_size, config.max_batch_size, config.compile)
        self.device = self.runner.device
        self.stats = dict(requests_finished=0, preemptions=0, prefix_cache_hit_tokens=0, prefill_tokens=0,
                          generation_tokens=0, steps=0)
        pool = BlockPool(self.runner.n_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(pool, config.max_batch_size, config.prefill_chunk, self.stats)
        self.inbox: list[Request] = []
        self.aborted: set[str] = set()
        self.lock = threading.Condition()

    # ------------------------------------------------------------------------------- from any thread

    def check(self, r: Request):
        """Raise ValueError (a client's mistake) if the request cannot be served."""
        n, vocab = len(r.prompt), self.model.config.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.context:
            raise ValueError(f"this model's maximum context length is {self.context} tokens; the prompt has {n}")
        if any(not 0 <= t < vocab for t in r.prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {r.max_tokens}")
        if n + r.max_tokens > self.context:
            raise ValueError(f"this model's maximum context length is {self.context} tokens; the request needs "
                             f"{n + r.max_tokens} ({n} in the prompt, {r.max_tokens} for the completion)")
        if -(-(n + r.max_tokens) // self.scheduler.pool.block_size) > self.scheduler.pool.n_blocks - 1:
            raise ValueError(f"the request needs {n + r.max_tokens} tokens of KV cache; the server's holds "
                             f"{(self.scheduler.pool.n_blocks - 1) * self.scheduler.pool.block_size}")
        if r.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if r.seed is not None and not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]:  # the engine's thread would fail
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (64 bits), not {r.seed}")

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

    # ------------------------------------------------------------------------------- the engine's thread

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, decode the running requests one token each, prefill one chunk. Returns whether it did any work."""
        self.runner.check_cache()
        self.take_inbox()
        decoding = self.scheduler.decode_rows()
        if decoding:
            self.forward(decoding, 1)
        chunk = self.scheduler.prefill_chunk_rows()
        if chunk and chunk[0]:
            self.forward(*chunk)
        self.stats["steps"] += 1
        return bool(decoding or chunk)

    def take_inbox(self):
        with self.lock:
            new, self.inbox = self.inbox, []
            aborted, self.aborted = self.aborted, set()
        for r in new:
            r.generator = seeded_generator(r.seed, self.device)
            if self.tokenizer is not None:
                r.decoder = StreamDecoder(self.tokenizer)
            if r.sampling.penalized:
                V = self.model.config.vocab_size
                r.counts = torch.zeros(V, device=self.device)
                r.seen = torch.zeros(V, dtype=torch.bool, device=self.device)
                r.seen[torch.tensor(r.prompt, device=self.device)] = True
            self.scheduler.waiting.append(r)
        for r in [r for r in (*self.scheduler.running, *self.scheduler.waiting) if r.id in aborted]:
            self.finish(r, "abort", flush=False)

    def forward(self, rows: list[Request], n: int):
        """One forward pass over n pending tokens of each row; rows with nothing left pending sample a token."""
        logits = self.runner.forward(rows, n)
        self.scheduler.computed(rows, n)
        if n > 1:
            self.stats["prefill_tokens"] += n
        ready = [i for i, r in enumerate(rows) if r.n_pending == 0]
        if ready:
            tokens = sample_rows(logits if len(ready) == len(rows) else logits[ready], [rows[i] for i in ready])
            for i, token in zip(ready, tokens):
                self.append(rows[i], token)

    def append(self, r: Request, token: int):
        now = time.perf_counter()
        r.first_token_time = r.first_token_time or now
        r.tokens.append(token)
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


def seeded_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g
