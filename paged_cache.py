"""The paged KV cache's bookkeeping (serving: engine.py): which of the pool's blocks are free, which hold which
sequence's tokens, and which hold a known token prefix that a new sequence can reuse (prefix caching).

The tensors themselves are model.PagedKVCache's pool; this file only hands out block numbers. A sequence's blocks,
in order, are its block table: token i lives in slot blocks[i // block_size] * block_size + i % block_size.
"""
import hashlib
from array import array
from collections import OrderedDict


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
