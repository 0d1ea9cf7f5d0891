"""The paged KV cache (serving: engine.py): the pool of blocks every layer keeps its keys and values in
(PagedKVCache, swapped into a loaded model by setup_paged_cache), and its bookkeeping (BlockPool): which blocks are
free, which hold which sequence's tokens, and which hold a known token prefix that a new sequence can reuse (prefix
caching). A sequence's blocks, in order, are its block table: token i lives in slot
blocks[i // block_size] * block_size + i % block_size.
"""
import hashlib
from array import array
from collections import OrderedDict

import torch
import torch.nn as nn
from torch import Tensor

from llama_fast.cpu.layers import attend_one
from model import Transformer, attention, causal_mask, precompute_freqs_cis


class PagedKVCache(nn.Module):
    """Keys and values of many sequences in one pool of fixed-size blocks, as vLLM's PagedAttention keeps them:
    (n_slots, n_kv_heads, head_dim), slot = block * block_size + offset. The model's forward hands each layer's cache
    (write, read): the slots the new tokens' keys and values go to (B, T), and each row's slots in position order
    (B, S), its block table expanded, so that key j is at position j."""

    def __init__(self, n_slots, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (n_slots, n_kv_heads, head_dim)
        self.register_buffer("k_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots: Tensor, k: Tensor, v: Tensor):
        B, H, T, D = k.shape  # (B, n_kv_heads, T, head_dim) to slots (B, T)
        self.k_pool[slots.flatten()] = k.transpose(1, 2).reshape(B * T, H, D)
        self.v_pool[slots.flatten()] = v.transpose(1, 2).reshape(B * T, H, D)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, slots: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        """k, v written to slots[0], then q's attention over each row's keys at slots[1]. A compiled CPU decode step
        (one token per row) reads the keys where they lie (attend_one: inductor fuses the indexing into the
        reductions; 2-core CPU, B=16 x 512 keys: 2.3 ms a layer against 18 for gather + SDPA). Otherwise each row's
        keys and values are gathered (index_select copies whole slots, 4x faster than indexing) for SDPA."""
        self.write(slots[0], k, v)
        if k.shape[2] == 1 and q.is_cpu and torch.compiler.is_compiling():
            return attend_one(q, self.k_pool[slots[1]], self.v_pool[slots[1]], mask[:, 0, 0])
        B, S = slots[1].shape
        read = slots[1].flatten()
        keys, values = (pool.index_select(0, read).view(B, S, *pool.shape[1:]).transpose(1, 2)
                        for pool in (self.k_pool, self.v_pool))
        return attention(q, keys, values, mask)


def setup_paged_cache(model: Transformer, n_blocks: int, block_size: int):
    """Give every layer a pool of n_blocks KV blocks of block_size tokens instead of the static cache (forward then
    takes cache_index=(write slots, read slots) and a mask: paged_forward)."""
    dtype, device = model.cache_dtype(), model.tok_embeddings.weight.device
    for layer in model.layers:
        layer.attention.kv_cache = PagedKVCache(n_blocks * block_size, layer.attention.n_kv_heads,
                                                model.config.head_dim, dtype, device)
    model.freqs_cis = precompute_freqs_cis(model.config.max_seq_len, model.config, device)
    model.max_batch_size = model.cache_len = 0  # a later setup_caches() allocates a static cache again


def paged_forward(model: Transformer, tokens: Tensor, positions: Tensor, slots: Tensor, key_slots: Tensor,
                  last_only: bool) -> Tensor:
    """The model's forward over the paged cache: tokens (B, T) at positions (B, T), their keys and values written to
    slots (B, T); each row reads its keys at key_slots (B, S), key j at position j, causally."""
    mask = causal_mask(key_slots.shape[1], positions, model.config)
    return model(tokens, positions, last_only=last_only, mask=mask, cache_index=(slots, key_slots))


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
