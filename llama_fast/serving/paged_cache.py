"""The paged KV cache (serving: engine.py): the pool of blocks every layer keeps its keys and values in
(PagedKVCache, swapped into a loaded model by setup_paged_cache), and its bookkeeping (BlockPool): which blocks are
free, which hold which sequence's tokens, and which hold a known token prefix that a new sequence can reuse (prefix
caching). A sequence's blocks, in order, are its block table: token i lives in slot
blocks[i // block_size] * block_size + i % block_size.
"""
import hashlib
from array import array
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from llama_fast.cpu.layers import attend_one
from model import Transformer, attention, causal_mask, precompute_freqs_cis


class PagedIndex(NamedTuple):
    """What every layer's PagedKVCache is told about a step's batch (the model's cache_index). The batch is ragged:
    its N new tokens lie in one row, (1, N), the tokens of rows decoding one token first (Bd of them), then the
    chunks of prompts being read. Every count is a tensor's shape, so one compiled graph serves any mix.
    slots: (1, N) where each new token's key and value go.
    decode_keys, decode_mask: (Bd, S) for each one-token row, its slots in position order (its block table
        expanded: key j at position j) and which of them it sees.
    prefill_keys, prefill_mask: (Sp,) the slots of every chunk's context, the chunks one after another, and
        (N - Bd, Sp) which of them each chunk token sees (its own row's, causally)."""
    slots: Tensor
    decode_keys: Tensor
    decode_mask: Tensor
    prefill_keys: Tensor
    prefill_mask: Tensor


class PagedKVCache(nn.Module):
    """Keys and values of many sequences in one pool of fixed-size blocks, as vLLM's PagedAttention keeps them:
    (n_slots, n_kv_heads, head_dim), slot = block * block_size + offset. A pool stored another way (int8:
    llama_fast/quant/kv_cache.py) overrides write, read, read_stored and slot_bytes."""

    def __init__(self, n_slots, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (n_slots, n_kv_heads, head_dim)
        self.register_buffer("k_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @staticmethod
    def slot_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """The memory one slot (one token of one layer) takes, keys and values."""
        return 2 * n_kv_heads * head_dim * dtype.itemsize

    def write(self, slots: Tensor, k: Tensor, v: Tensor):
        B, H, T, D = k.shape  # (B, n_kv_heads, T, head_dim) to slots (B, T)
        self.k_pool[slots.flatten()] = k.transpose(1, 2).reshape(B * T, H, D)
        self.v_pool[slots.flatten()] = v.transpose(1, 2).reshape(B * T, H, D)

    def read(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values at slots (any shape): (*slots.shape, n_kv_heads, head_dim) each."""
        return take(self.k_pool, slots), take(self.v_pool, slots)

    def read_stored(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The keys and values at slots as stored, and their scales if they are stored scaled (else None)."""
        return *self.read(slots), None, None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, index: PagedIndex, mask: Tensor) -> Tensor:
        """k, v (1, n_kv_heads, N, head_dim) written to their slots, then each new token's attention over its own
        row's keys: the one-token rows together, the prompt chunks together (mask: unused, the index has both)."""
        self.write(index.slots, k, v)
        _, Hkv, N, D = k.shape
        q = q.view(Hkv, -1, N, D)  # (kv head, query head of that group, token, head_dim)
        Bd = index.decode_keys.shape[0]
        parts = []
        if Bd:
            parts.append(self.attend_decode(q[:, :, :Bd], index.decode_keys, index.decode_mask))
        if Bd < N:
            parts.append(self.attend_prefill(q[:, :, Bd:], index.prefill_keys, index.prefill_mask))
        return (torch.cat(parts, 2) if len(parts) == 2 else parts[0]).reshape(1, Hkv, -1, D)

    def attend_decode(self, q: Tensor, key_slots: Tensor, mask: Tensor) -> Tensor:
        """q (n_kv_heads, n_rep, B, head_dim), one token per row, over its row's keys at key_slots (B, S). A
        compiled CPU step reads the keys where they lie (attend_one: inductor fuses the indexing into the
        reductions, which an int8 pool's scales multiply outside the sums over head_dim; 2-core CPU, B=16 x 512
        keys: 2.3 ms a layer against 18 for gather + SDPA). Otherwise each row's keys and values are gathered for
        SDPA."""
        q = q.permute(2, 0, 1, 3)  # (B, n_kv_heads, n_rep, head_dim)
        if q.is_cpu and torch.compiler.is_compiling():
            keys, values, key_scale, value_scale = self.read_stored(key_slots)
            y = attend_one(q, keys, values, mask, key_scale, value_scale)
        else:
            keys, values = (x.transpose(1, 2) for x in self.read(key_slots))
            y = attention(q, keys, values, mask[:, None, None])
        return y.permute(1, 2, 0, 3)

    def attend_prefill(self, q: Tensor, key_slots: Tensor, mask: Tensor) -> Tensor:
        """q (n_kv_heads, n_rep, T, head_dim), the chunks' tokens, over the keys at key_slots (S,) that mask
        (T, S) lets each see: one SDPA call for every chunk of the step (a step has few)."""
        Hkv, n_rep, T, D = q.shape
        keys, values = (x.transpose(0, 1)[None] for x in self.read(key_slots))
        y = attention(q.reshape(1, Hkv, n_rep * T, D), keys, values, mask[None, None])
        return y.view(Hkv, n_rep, T, D)


def take(pool: Tensor, slots: Tensor) -> Tensor:
    """pool's rows at slots (any shape): compiled, an index that inductor fuses into whatever reads it; eager,
    index_select, which copies whole rows (4x faster than indexing)."""
    if torch.compiler.is_compiling():
        return pool[slots]
    return pool.index_select(0, slots.flatten()).view(*slots.shape, *pool.shape[1:])


def setup_paged_cache(model: Transformer, n_blocks: int, block_size: int, cache_class=PagedKVCache):
    """Give every layer a pool of n_blocks KV blocks of block_size tokens (a cache_class) instead of the static
    cache (forward then takes a PagedIndex as cache_index: paged_forward)."""
    dtype, device = model.cache_dtype(), model.tok_embeddings.weight.device
    for layer in model.layers:
        layer.attention.kv_cache = cache_class(n_blocks * block_size, layer.attention.n_kv_heads,
                                               model.config.head_dim, dtype, device)
    model.freqs_cis = precompute_freqs_cis(model.config.max_seq_len, model.config, device)
    model.max_batch_size = model.cache_len = 0  # a later setup_caches() allocates a static cache again


def paged_forward(model: Transformer, tokens: Tensor, positions: Tensor, slots: Tensor, decode_keys: Tensor,
                  prefill_keys: Tensor, prefill_key_positions: Tensor, prefill_key_rows: Tensor,
                  prefill_rows: Tensor, logits_at: Tensor) -> Tensor:
    """The model's forward over the paged cache for a ragged batch (PagedIndex): tokens (1, N) at positions (1, N)
    written to slots (1, N); the first decode_keys.shape[0] tokens are one-token rows reading their keys at
    decode_keys (B, S), key j at position j; the others are chunks of prompts, the chunk of token i being
    prefill_rows[i], reading the keys at prefill_keys (Sp,), which belong to chunk prefill_key_rows and lie at
    prefill_key_positions. Float logits (K, V) of the tokens logits_at (K,) names."""
    pos = positions[0]
    Bd = decode_keys.shape[0]
    decode_mask = causal_mask(decode_keys.shape[1], pos[:Bd], model.config)
    prefill_mask = causal_mask(prefill_key_positions, pos[Bd:], model.config) & \
        (prefill_key_rows == prefill_rows[:, None])
    index = PagedIndex(slots, decode_keys, decode_mask, prefill_keys, prefill_mask)
    no_mask = decode_mask.new_ones(1, 1, 0)  # the masks travel in index: a ragged batch has two
    return model(tokens, positions, mask=no_mask, cache_index=index, logits_at=logits_at)[0]


def block_digest(parent: bytes, tokens) -> bytes:
    """The identity of a full block: its tokens and, through the parent's digest, every token before them."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockPool:
    """n_blocks blocks, reference-counted. Block 0 is never handed out: the padding rows of a batch write there.

    A full block whose tokens are known is registered under its digest (register), and a later sequence with the
    same prefix takes it instead of computing it again (match). A block whose last user ended stays registered
    while it waits in the free list, least recently freed first, and is only forgotten when it is handed out again.
    """

    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True):
        if n_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is reserved for padding)")
        self.n_blocks, self.block_size, self.prefix_caching = n_blocks, block_size, prefix_caching
        self.refs = [0] * n_blocks
        self.digest_of: list[bytes | None] = [None] * n_blocks
        self.cached: dict[bytes, int] = {}  # digest -> the block holding that prefix's last block of tokens
        self.free = OrderedDict.fromkeys(range(1, n_blocks))

    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - 1 - len(self.free)

    def allocate(self) -> int | None:
        """A free block (forgetting the prefix it held), or None when every block is in use."""
        if not self.free:
            return None
        block, _ = self.free.popitem(last=False)
        if self.digest_of[block] is not None:
            del self.cached[self.digest_of[block]]
            self.digest_of[block] = None
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]):
        """A sequence ends or is preempted: its blocks lose a user; the last ones are the first to be reused."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None

    def match(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """The blocks already holding the longest run of tokens' full blocks (each now one user more), and the
        digests of those blocks."""
        blocks, digests, parent = [], [], b""
        if not self.prefix_caching:
            return blocks, digests
        bs = self.block_size
        for i in range(len(tokens) // bs):
            parent = block_digest(parent, tokens[i * bs:(i + 1) * bs])
            block = self.cached.get(parent)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            blocks.append(block)
            digests.append(parent)
        return blocks, digests

    def register(self, block: int, digest: bytes):
        """block now holds the full block of tokens that digest names: later sequences may share it."""
        if self.prefix_caching and digest not in self.cached:
            self.cached[digest] = block
            self.digest_of[block] = digest
