"""Which requests run in a step and where their keys and values go (nano-vllm's Scheduler with its BlockManager):
the waiting queue, the running batch in the order it was admitted, and the pool of KV blocks they hold."""
from collections import deque

from llama_fast.serving.paged_cache import BlockPool, block_digest
from llama_fast.serving.request import Request


class Scheduler:
    """Waiting requests are admitted while the batch has room (reusing the KV blocks of a prefix already cached);
    every running request whose next token is known decodes it; then one request still reading its prompt reads its
    next chunk of prefill_chunk tokens, so a long prompt delays the others by one chunk at most. A request that needs
    a KV block when none is free preempts the most recently admitted one, whose blocks are freed and which is
    computed again (prompt and tokens so far) when it is admitted again. stats: the engine's counters."""

    def __init__(self, pool: BlockPool, max_batch_size: int, prefill_chunk: int, stats: dict):
        self.pool, self.max_batch_size, self.prefill_chunk, self.stats = pool, max_batch_size, prefill_chunk, stats
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order they were admitted

    def decode_rows(self) -> list[Request]:
        """Admit what fits, then the running requests that decode one token this step, each with a block for it."""
        self.admit()
        return self.reserve([r for r in self.running if r.n_pending == 1], 1)

    def prefill_chunk_rows(self) -> tuple[list[Request], int] | None:
        """The request still reading its prompt and how many of its tokens this step computes ([] if making room
        for them preempted it); None when no request is reading a prompt."""
        r = next((r for r in self.running if r.n_pending > 1), None)
        if r is None:
            return None
        n = min(r.n_pending, self.prefill_chunk)
        return self.reserve([r], n), n

    def admit(self):
        """Waiting requests join the batch while there is room and no other request is still reading its prompt."""
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.max_batch_size:
            if any(r.n_pending > 1 for r in self.running):
                return
            r = self.waiting[0]
            first_chunk = -(-min(len(r.tokens), self.prefill_chunk) // bs)
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

    def computed(self, rows: list[Request], n: int):
        """n more tokens of each row are in the cache: full blocks become reusable by a later prompt."""
        bs = self.pool.block_size
        for r in rows:
            r.n_computed += n
            for i in range(len(r.digests), r.n_computed // bs):
                digest = block_digest(r.digests[-1] if r.digests else b"", r.tokens[i * bs:(i + 1) * bs])
                self.pool.register(r.blocks[i], digest)
                r.digests.append(digest)

    def remove(self, r: Request):
        """r is finished: out of the batch or the queue, its blocks back to the pool."""
        if r in self.running:
            self.running.remove(r)
            self.pool.release(r.blocks)
            r.blocks = []
        elif r in self.waiting:
            self.waiting.remove(r)
            self.pool.release(r.blocks)
