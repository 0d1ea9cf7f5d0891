"""The serving engine: continuous batching over a paged KV cache, with prefix caching and preemption. No HTTP here
(serve.py puts it behind an OpenAI-compatible API); from Python:

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=16))
    done = engine.generate([prompt_ids, ...], max_tokens=100, sampling=SamplingConfig(temperature=0))
    print(done[0].text, done[0].finish_reason)

Each step(): waiting requests are admitted while the batch has room (reusing the KV blocks of a prefix already
cached); every running request whose next token is known decodes it, all in one forward pass of shape (batch, 1),
each row at its own position; then one request still reading its prompt reads its next chunk of `prefill_chunk`
tokens, so a long prompt delays the others by one chunk at most. Each row samples with its own settings and random
generator. A request that needs a KV block when none is free preempts the most recently admitted one, whose blocks
are freed and which is computed again (prompt and tokens so far) when it is admitted again.
"""
import functools
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

import tp
from decoding import compile_dynamic, cpu_inductor, specialize_floats
from model import Transformer
from llama_fast.serving.paged_cache import BlockPool, block_digest, paged_forward, setup_paged_cache
from sampling import SamplingConfig, apply_penalties, draw, logits_to_probs
from tokenizer import StreamDecoder

GREEDY = SamplingConfig(temperature=0)
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


@dataclass(eq=False)
class Request:
    """One prompt to complete. on_output(request, text, token_ids) is called (from the engine's thread) with what
    each step added; request.finish_reason is set when it is the last call: "stop" (EOS or a stop string),
    "length" (max_tokens) or "abort"."""
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = GREEDY
    stop: tuple[str, ...] = ()  # text that ends the output (not included in it)
    eos_ids: tuple[int, ...] = ()  # tokens that end the output (not included in it)
    seed: int | None = None  # the request's own random generator: the same text whatever else runs beside it
    on_output: Callable | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # the engine's state
    tokens: list[int] = field(default_factory=list)  # prompt, then output
    text: str = ""  # the output as text, cut before a stop string
    finish_reason: str | None = None
    blocks: list[int] = field(default_factory=list)  # the block table
    digests: list[bytes] = field(default_factory=list)  # of the full blocks registered for prefix caching
    n_computed: int = 0  # tokens whose keys and values are in the cache
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at the first admission
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    sent: int = 0  # characters of text already passed to on_output

    def __post_init__(self):
        self.tokens = list(self.prompt)
        self.generator = None
        self.decoder = None
        self.seen = self.counts = None  # penalties: tokens of prompt and output; counts of output tokens

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def n_pending(self) -> int:  # tokens to compute before the next one can be sampled
        return len(self.tokens) - self.n_computed


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.context = model.config.max_seq_len
        bs = config.block_size
        self.max_blocks = -(-self.context // bs)  # per sequence
        n_blocks = -(-pool_tokens(model, config) // bs) + 1
        setup_paged_cache(model, n_blocks, bs)
        self.cache = model.layers[0].attention.kv_cache  # step() checks nobody replaced it
        self.pool = BlockPool(n_blocks, bs, config.prefix_caching)
        self.device = model.freqs_cis.device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order they were admitted
        self.inbox: list[Request] = []
        self.aborted: set[str] = set()
        self.lock = threading.Condition()
        self.stats = dict(requests_finished=0, preemptions=0, prefix_cache_hit_tokens=0, prefill_tokens=0,
                          generation_tokens=0, steps=0)
        self.decode_forward = self.prefill_forward = functools.partial(paged_forward, model)
        if config.compile:
            self.decode_forward, self.prefill_forward = compile_forward(model, self.device.type)

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
        if -(-(n + r.max_tokens) // self.pool.block_size) > self.pool.n_blocks - 1:
            raise ValueError(f"the request needs {n + r.max_tokens} tokens of KV cache; the server's holds "
                             f"{(self.pool.n_blocks - 1) * self.pool.block_size}")
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
        return bool(self.running or self.waiting or self.inbox)

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
        if self.model.layers[0].attention.kv_cache is not self.cache:
            raise RuntimeError("the model's KV cache was replaced (generate(), setup_caches() or another Engine on "
                               "the model this Engine serves): an Engine owns its model; use a copy for other work")
        self.take_inbox()
        self.admit()
        decoding = self.reserve([r for r in self.running if r.n_pending == 1], 1)
        if decoding:
            self.forward(decoding, 1)
        prefilling = next((r for r in self.running if r.n_pending > 1), None)
        if prefilling:
            n = min(prefilling.n_pending, self.config.prefill_chunk)
            if self.reserve([prefilling], n):
                self.forward([prefilling], n)
        self.stats["steps"] += 1
        return bool(decoding or prefilling)

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
            self.waiting.append(r)
        for r in [r for r in (*self.running, *self.waiting) if r.id in aborted]:
            self.finish(r, "abort", flush=False)

    def admit(self):
        """Waiting requests join the batch while there is room and no other request is still reading its prompt."""
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.config.max_batch_size:
            if any(r.n_pending > 1 for r in self.running):
                return
            r = self.waiting[0]
            first_chunk = -(-min(len(r.tokens), self.config.prefill_chunk) // bs)
            if self.running and self.pool.n_free < first_chunk:
                return
            self.waiting.popleft()
            r.blocks, r.digests = self.pool.match(r.tokens[:-1])  # the last token is computed: it gives the logits
            r.n_computed = len(r.blocks) * bs
            if r.first_token_time is None:
                r.cached_tokens = r.n_computed
            self.stats["prefix_cache_hit_tokens"] += r.n_computed
            self.running.append(r)

    def reserve(self, rows: list[Request], n: int) -> list[Request]:
        """Blocks for n more tokens of each row, preempting the most recently admitted requests while the pool is
        empty. Returns the rows still running."""
        bs = self.pool.block_size
        for r in rows:
            while r in self.running and len(r.blocks) * bs < r.n_computed + n:
                block = self.pool.allocate()
                if block is None:
                    self.preempt(self.running[-1])
                else:
                    r.blocks.append(block)
        return [r for r in rows if r in self.running]

    def preempt(self, r: Request):
        self.pool.release(r.blocks)
        r.blocks, r.digests, r.n_computed = [], [], 0
        self.running.remove(r)
        self.waiting.appendleft(r)
        self.stats["preemptions"] += 1

    def forward(self, rows: list[Request], n: int):
        """One forward pass over n pending tokens of each row; rows with nothing left pending sample a token."""
        logits = run_model(self.decode_forward if n == 1 else self.prefill_forward,
                           *self.batch_tensors(rows, n), last_only=n > 1)[:, -1]
        for r in rows:
            r.n_computed += n
            self.register_full_blocks(r)
        if n > 1:
            self.stats["prefill_tokens"] += n
        ready = [(i, r) for i, r in enumerate(rows) if r.n_pending == 0]
        if ready:
            self.sample(ready, logits)

    def batch_tensors(self, rows: list[Request], n: int):
        """(tokens, positions, slots) (B, n) and key slots (B, S) for the rows. Compiled on CUDA they are padded,
        so that a bounded number of CUDA graphs serves every step: B to a power of two (at most max_batch_size),
        the block count to a power of two (at most a context's); padding rows write to block 0 and read it. The
        CPU's graph has dynamic shapes and takes them as they are (padding would only add work)."""
        bs, padded = self.pool.block_size, self.config.compile and self.device.type == "cuda"
        B = min(next_power_of_two(len(rows)), self.config.max_batch_size) if padded else len(rows)
        n_blocks = max(len(r.blocks) for r in rows)
        n_blocks = min(next_power_of_two(n_blocks), self.max_blocks) if padded else n_blocks
        tokens, positions, slots, tables = [[0] * n] * B, [[0] * n] * B, [[0] * n] * B, [[0] * n_blocks] * B
        for i, r in enumerate(rows):
            positions[i] = list(range(r.n_computed, r.n_computed + n))
            tokens[i] = r.tokens[r.n_computed:r.n_computed + n]
            slots[i] = [r.blocks[p // bs] * bs + p % bs for p in positions[i]]
            tables[i] = r.blocks + [0] * (n_blocks - len(r.blocks))
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        tables = as_tensor(tables)
        key_slots = (tables[:, :, None] * bs + torch.arange(bs, device=self.device)).flatten(1)
        return as_tensor(tokens), as_tensor(positions), as_tensor(slots), key_slots

    def register_full_blocks(self, r: Request):
        bs = self.pool.block_size
        for i in range(len(r.digests), r.n_computed // bs):
            digest = block_digest(r.digests[-1] if r.digests else b"", r.tokens[i * bs:(i + 1) * bs])
            self.pool.register(r.blocks[i], digest)
            r.digests.append(digest)

    def sample(self, ready: list, logits: Tensor):
        greedy = logits.argmax(-1).tolist()  # one host sync for the whole batch
        for i, r in ready:
            cfg = r.sampling
            if cfg.greedy and not cfg.penalized:
                token = greedy[i]
            else:
                row = logits[i:i + 1]
                if cfg.penalized:
                    row = apply_penalties(row, cfg, r.seen[None], r.counts[None])
                token = int(row.argmax()) if cfg.greedy else int(draw(logits_to_probs(row, cfg), r.generator))
            self.append(r, token)

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
        if r in self.running:
            self.running.remove(r)
            self.pool.release(r.blocks)
            r.blocks = []
        elif r in self.waiting:
            self.waiting.remove(r)
            self.pool.release(r.blocks)
        self.stats["requests_finished"] += 1
        if r.on_output:
            token = r.tokens[-1:] if reason != "abort" and len(r.tokens) > len(r.prompt) else []
            r.on_output(r, r.text[r.sent:], token)
            r.sent = len(r.text)


def pool_tokens(model: Transformer, config: EngineConfig) -> int:
    """The KV pool's size in tokens: as configured, else max_batch_size full contexts or half the memory that is
    free now (CPU: MemAvailable; CUDA: the device's free memory), whichever is smaller."""
    if config.kv_cache_tokens:
        return config.kv_cache_tokens
    layer = model.layers[0].attention
    dtype = model.tok_embeddings.weight.dtype
    per_token = 2 * len(model.layers) * layer.n_kv_heads * layer.head_dim * dtype.itemsize  # K and V
    if config.kv_cache_gb:
        return int(config.kv_cache_gb * 2**30 // per_token)
    device = model.tok_embeddings.weight.device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return max(min(config.max_batch_size * model.config.max_seq_len, free // 2 // per_token), model.config.max_seq_len)


def seeded_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def run_model(forward, tokens, positions, slots, key_slots, last_only: bool) -> Tensor:
    """The forward pass; under tensor parallelism rank 0 first sends the step's inputs to the other ranks, which
    run the same pass (worker_loop)."""
    if tp.world_size() > 1 and tp.rank() == 0:
        tp.from_rank0(([t.cpu() for t in (tokens, positions, slots, key_slots)], last_only))
    return forward(tokens, positions, slots, key_slots, last_only=last_only)


WORKER_PING_S = 60  # an idle server tells its other ranks it is alive well within the process group's timeout


def worker_loop(engine: Engine):
    """A tensor-parallel rank other than 0: run the forward passes rank 0 schedules, until it sends None
    (stop_workers). Rank 0 sends "ping" while idle (ping_workers)."""
    while (step := tp.from_rank0(None)) is not None:
        if step == "ping":
            continue
        tensors, last_only = step
        with torch.inference_mode():
            run_model(engine.prefill_forward if last_only else engine.decode_forward,
                      *[t.to(engine.device) for t in tensors], last_only=last_only)
    tp.barrier()  # stop_workers' pair: every rank is done communicating before any tears the group down


def ping_workers():
    if tp.world_size() > 1:
        tp.from_rank0("ping")


def stop_workers():
    """Rank 0, at shutdown: end the other ranks' worker_loop."""
    if tp.world_size() > 1:
        tp.from_rank0(None)
        tp.barrier()  # rank 0 leaves once the others have the message (an exit mid-broadcast aborted one, once)


def compile_forward(model: Transformer, device: str):
    """(decode, prefill) forward passes compiled. On CUDA, decode is a CUDA graph for each padded (batch, blocks)
    shape; otherwise one function with dynamic shapes serves both (a chunk has any length)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    prefill = compile_dynamic(paged_forward, backend=cpu_inductor() if device == "cpu" else "inductor")
    decode = prefill
    if device == "cuda":
        decode = specialize_floats(torch.compile(paged_forward, fullgraph=True, mode="reduce-overhead"))
    return functools.partial(decode, model), functools.partial(prefill, model)
