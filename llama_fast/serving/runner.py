"""The model's side of a serving step (nano-vllm's ModelRunner): the paged KV cache it allocates, the batch laid out
as tensors, the forward pass (compiled if asked) and, under tensor parallelism, the other ranks running the same pass
as rank 0."""
import functools

import torch
from torch import Tensor

from decoding import compile_dynamic, cpu_inductor, specialize_floats
from llama_fast.serving.paged_cache import PagedKVCache, paged_forward, setup_paged_cache
from llama_fast.serving.request import Request, n_logits
from model import Transformer
import tp

WORKER_PING_S = 60  # an idle server tells its other ranks it is alive well within the process group's timeout


class ModelRunner:
    """Allocates a pool of n_blocks KV blocks of block_size tokens in the model (pool_tokens; a cache_class, of
    pool_bytes in all) and runs forward passes over it. compile: torch.compile the forward (on CUDA, batch and block
    counts padded to powers of two)."""

    def __init__(self, model: Transformer, block_size: int, pool_size: int, max_batch_size: int, compile: bool,
                 cache_class=PagedKVCache):
        self.model, self.block_size, self.max_batch_size = model, block_size, max_batch_size
        self.max_blocks = -(-model.config.max_seq_len // block_size)  # per sequence
        self.n_blocks = -(-pool_size // block_size) + 1
        setup_paged_cache(model, self.n_blocks, block_size, cache_class)
        self.pool_bytes = self.n_blocks * block_size * token_bytes(model, cache_class)
        self.cache = model.layers[0].attention.kv_cache  # check_cache() sees whether anybody replaced it
        self.device = model.freqs_cis.device
        self.padded = compile and self.device.type == "cuda"
        self.decode_forward = self.prefill_forward = functools.partial(paged_forward, model)
        if compile:
            self.decode_forward, self.prefill_forward = compile_forward(model, self.device.type)

    def check_cache(self):
        if self.model.layers[0].attention.kv_cache is not self.cache:
            raise RuntimeError("the model's KV cache was replaced (generate(), setup_caches() or another Engine on "
                               "the model this Engine serves): an Engine owns its model; use a copy for other work")

    def forward(self, rows: list[tuple[Request, int]]) -> Tensor:
        """One forward pass computing n pending tokens of each (row, n), the one-token rows first: the logits (K, V)
        after each row's last computed token, and after every one of a row verifying a draft (its n tokens are its
        next one and r.draft) or scoring its prompt (n_logits), row after row."""
        tensors = self.batch_tensors(rows)
        decode_only = tensors[1].shape[1] == tensors[3].shape[0]  # every token is a one-token row's
        logits = run_model(self.decode_forward if decode_only else self.prefill_forward, tensors, decode_only)
        return logits[:sum(n_logits(r, n) for r, n in rows)]

    def probe(self):
        """A forward pass of one token at position 0 in block 0 (the padding rows' block): raises if the model
        fails whatever it is given."""
        nobody = Request([1], 1)
        nobody.blocks = [0]
        self.forward([(nobody, 1)])

    def decode_shapes(self) -> list[tuple[int, int]]:
        """The (rows, blocks) a padded decode step can take (batch_tensors): each one CUDA graph."""
        return [(rows, blocks) for rows in padded_sizes(self.max_batch_size)
                for blocks in padded_sizes(self.max_blocks)]

    def capture_decode_graphs(self):
        """Run every padded decode shape once, so that CUDA graphs are captured at start-up and not in the middle
        of live traffic: rows at position 0 of block 0, the padding rows' block."""
        for rows, blocks in self.decode_shapes():
            nobody = Request([1], 1)
            nobody.blocks = [0] * blocks
            self.forward([(nobody, 1)] * rows)

    def batch_tensors(self, rows: list[tuple[Request, int]]) -> tuple[Tensor, ...]:
        """paged_forward's inputs for the rows (one row of all the new tokens; see PagedIndex). Compiled on CUDA, a
        step of one-token rows only is padded so that a bounded number of CUDA graphs serves every such step: the
        rows to a power of two (at most max_batch_size), the block count to a power of two (at most a context's);
        padding rows write to block 0 and read it. Other steps, and every CPU step, take the shapes as they are
        (the graphs have dynamic shapes; padding would only add work)."""
        bs = self.block_size
        decode = [r for r, n in rows if n == 1]
        chunks = [(r, n) for r, n in rows if n > 1]
        assert len(decode) == len(rows) - len(chunks) and all(n == 1 for _, n in rows[:len(decode)])
        tokens, positions, slots = [], [], []
        for r, n in rows:
            span = range(r.n_computed, r.n_computed + n)
            tokens += (r.tokens + r.draft if r.draft else r.tokens)[span.start:span.stop]
            positions += span
            slots += [r.blocks[p // bs] * bs + p % bs for p in span]
        logits_at = list(range(len(decode)))
        n_blocks = max((len(r.blocks) for r in decode), default=0)
        if self.padded and not chunks:
            pad = min(next_power_of_two(len(decode)), self.max_batch_size) - len(decode)
            tokens, positions, slots, logits_at = (x + [0] * pad for x in (tokens, positions, slots, logits_at))
            n_blocks = min(next_power_of_two(n_blocks), self.max_blocks)
            tables = [r.blocks + [0] * (n_blocks - len(r.blocks)) for r in decode] + [[0] * n_blocks] * pad
        else:
            tables = [r.blocks + [0] * (n_blocks - len(r.blocks)) for r in decode]
        key_slots, key_positions, key_rows, chunk_rows, end = [], [], [], [], len(decode)
        for c, (r, n) in enumerate(chunks):
            context = r.n_computed + n
            key_slots += [b * bs + o for b in r.blocks[:-(-context // bs)] for o in range(bs)][:context]
            key_positions += range(context)
            key_rows += [c] * context
            chunk_rows += [c] * n
            logits_at += range(end, end + n) if n_logits(r, n) > 1 else [end + n - 1]
            end += n
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        table = as_tensor(tables).view(len(tables), n_blocks)
        decode_keys = (table[:, :, None] * bs + torch.arange(bs, device=self.device)).flatten(1)
        return (as_tensor([tokens]), as_tensor([positions]), as_tensor([slots]), decode_keys, as_tensor(key_slots),
                as_tensor(key_positions), as_tensor(key_rows), as_tensor(chunk_rows), as_tensor(logits_at))


def pool_tokens(model: Transformer, max_batch_size: int, kv_cache_tokens: int = 0, kv_cache_gb: float = 0.0,
                cache_class=PagedKVCache, context: int = 0) -> int:
    """The KV pool's size in tokens: kv_cache_tokens, or kv_cache_gb of memory, else max_batch_size full contexts
    (context tokens each; 0: the model's) or half the memory that is free now (CPU: MemAvailable; CUDA: the device's
    free memory), whichever is smaller."""
    context = context or model.config.max_seq_len
    if kv_cache_tokens:
        return kv_cache_tokens
    per_token = token_bytes(model, cache_class)
    if kv_cache_gb:
        return int(kv_cache_gb * 2**30 // per_token)
    device = model.tok_embeddings.weight.device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return max(min(max_batch_size * context, free // 2 // per_token), context)


def token_bytes(model: Transformer, cache_class=PagedKVCache) -> int:
    """The KV-cache memory one token takes, every layer's keys and values (the layer's own head count: under tensor
    parallelism, this rank's)."""
    layer = model.layers[0].attention
    return len(model.layers) * cache_class.slot_bytes(layer.n_kv_heads, layer.head_dim, model.cache_dtype())


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def padded_sizes(limit: int) -> list[int]:
    """What min(next_power_of_two(n), limit) takes for n in 1..limit."""
    return sorted({min(1 << k, limit) for k in range(limit.bit_length() + 1)})


def run_model(forward, tensors: tuple[Tensor, ...], decode_only: bool) -> Tensor:
    """The forward pass; under tensor parallelism rank 0 first sends the step's inputs to the other ranks, which
    run the same pass (worker_loop)."""
    if tp.world_size() > 1 and tp.rank() == 0:
        tp.from_rank0(([t.cpu() for t in tensors], decode_only))
    return forward(*tensors)


def worker_loop(runner: ModelRunner):
    """A tensor-parallel rank other than 0: run the forward passes rank 0 schedules, until it sends None
    (stop_workers). Rank 0 sends "ping" while idle (ping_workers)."""
    while (step := tp.from_rank0(None)) is not None:
        if step == "ping":
            continue
        tensors, decode_only = step
        with torch.inference_mode():
            run_model(runner.decode_forward if decode_only else runner.prefill_forward,
                      [t.to(runner.device) for t in tensors], decode_only)
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
    """(decode, prefill) forward passes compiled. On CUDA, decode (one-token rows only) is a CUDA graph for each
    padded (batch, blocks) shape; otherwise one function with dynamic shapes serves every step. Its sizes are
    independent of each other: without duck sizing, which would give two sizes that were equal when a graph was
    traced (a first chunk's length and its context's) one symbol, and compile again when they differ."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    prefill = compile_dynamic(paged_forward, backend=cpu_inductor() if device == "cpu" else "inductor")
    decode = prefill
    if device == "cuda":
        decode = specialize_floats(torch.compile(paged_forward, fullgraph=True, mode="reduce-overhead"))
    return without_duck_sizing(functools.partial(decode, model)), without_duck_sizing(functools.partial(prefill, model))


def without_duck_sizing(compiled):
    def run(*args):
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*args)
    return run
