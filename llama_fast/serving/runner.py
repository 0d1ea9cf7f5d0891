"""The model's side of a serving step (nano-vllm's ModelRunner): the paged KV cache it allocates, the batch laid out
as tensors, the forward pass (compiled if asked) and, under tensor parallelism, the other ranks running the same pass
as rank 0."""
import functools

import torch
from torch import Tensor

from decoding import compile_dynamic, cpu_inductor, specialize_floats
from llama_fast.serving.paged_cache import paged_forward, setup_paged_cache
from llama_fast.serving.request import Request
from model import Transformer
import tp

WORKER_PING_S = 60  # an idle server tells its other ranks it is alive well within the process group's timeout


class ModelRunner:
    """Allocates a pool of n_blocks KV blocks of block_size tokens in the model (pool_tokens) and runs forward
    passes over it. compile: torch.compile the forward (on CUDA, batch and block counts padded to powers of two)."""

    def __init__(self, model: Transformer, block_size: int, pool_size: int, max_batch_size: int, compile: bool):
        self.model, self.block_size, self.max_batch_size = model, block_size, max_batch_size
        self.max_blocks = -(-model.config.max_seq_len // block_size)  # per sequence
        self.n_blocks = -(-pool_size // block_size) + 1
        setup_paged_cache(model, self.n_blocks, block_size)
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

    def forward(self, rows: list[Request], n: int) -> Tensor:
        """Logits (len(rows), V) after n pending tokens of each row (its last one for a chunk of a prompt)."""
        logits = run_model(self.decode_forward if n == 1 else self.prefill_forward, *self.batch_tensors(rows, n),
                           last_only=n > 1)
        return logits[:len(rows), -1]

    def batch_tensors(self, rows: list[Request], n: int):
        """(tokens, positions, slots) (B, n) and key slots (B, S) for the rows. Compiled on CUDA they are padded,
        so that a bounded number of CUDA graphs serves every step: B to a power of two (at most max_batch_size),
        the block count to a power of two (at most a context's); padding rows write to block 0 and read it. The
        CPU's graph has dynamic shapes and takes them as they are (padding would only add work)."""
        bs = self.block_size
        B = min(next_power_of_two(len(rows)), self.max_batch_size) if self.padded else len(rows)
        n_blocks = max(len(r.blocks) for r in rows)
        n_blocks = min(next_power_of_two(n_blocks), self.max_blocks) if self.padded else n_blocks
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


def pool_tokens(model: Transformer, max_batch_size: int, kv_cache_tokens: int = 0, kv_cache_gb: float = 0.0) -> int:
    """The KV pool's size in tokens: kv_cache_tokens, or kv_cache_gb of memory, else max_batch_size full contexts or
    half the memory that is free now (CPU: MemAvailable; CUDA: the device's free memory), whichever is smaller."""
    if kv_cache_tokens:
        return kv_cache_tokens
    layer = model.layers[0].attention
    dtype = model.tok_embeddings.weight.dtype
    per_token = 2 * len(model.layers) * layer.n_kv_heads * layer.head_dim * dtype.itemsize  # K and V
    if kv_cache_gb:
        return int(kv_cache_gb * 2**30 // per_token)
    device = model.tok_embeddings.weight.device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return max(min(max_batch_size * model.config.max_seq_len, free // 2 // per_token), model.config.max_seq_len)


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def run_model(forward, tokens, positions, slots, key_slots, last_only: bool) -> Tensor:
    """The forward pass; under tensor parallelism rank 0 first sends the step's inputs to the other ranks, which
    run the same pass (worker_loop)."""
    if tp.world_size() > 1 and tp.rank() == 0:
        tp.from_rank0(([t.cpu() for t in (tokens, positions, slots, key_slots)], last_only))
    return forward(tokens, positions, slots, key_slots, last_only=last_only)


def worker_loop(runner: ModelRunner):
    """A tensor-parallel rank other than 0: run the forward passes rank 0 schedules, until it sends None
    (stop_workers). Rank 0 sends "ping" while idle (ping_workers)."""
    while (step := tp.from_rank0(None)) is not None:
        if step == "ping":
            continue
        tensors, last_only = step
        with torch.inference_mode():
            run_model(runner.prefill_forward if last_only else runner.decode_forward,
                      *[t.to(runner.device) for t in tensors], last_only=last_only)
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
