"""Which requests run in a step and where their keys and values go (nano-vllm's Scheduler with its BlockManager):
the waiting queue, the running batch in the order it was admitted, and the pool of KV blocks they hold."""
import itertools
import math
from collections import deque

from llama_fast.serving.paged_cache import BlockPool, block_digest
from llama_fast.serving.request import Request
from llama_fast.serving.step_time import StepTimes

LOAD_WINDOW = 128  # steps over which the prompt tokens the load brings are averaged (load_share)
LOAD_MARGIN = 1.25  # a step with decoding rows reads at least this many times that average, so a backlog drains
BACKLOG_STEPS = 32  # and at least the prompt tokens still to read of the running requests over this many steps


class Scheduler:
    """Which requests compute which tokens in a step, as vLLM V1 schedules: one forward pass per step computes at
    most max_tokens tokens (the token budget). Running requests come first, in the order they were admitted: each
    decoding one computes its next token, each still reading its prompt its next chunk (at most prefill_chunk
    tokens, so that one long prompt cannot take the whole budget); then waiting requests are admitted while the
    budget, the batch (max_batch_size requests) and the pool have room, reusing the KV blocks of a prefix already
    cached, and start reading their prompts in the same step. Beside decoding rows, the tokens of prompt chunks and
    drafts are also bounded in time: as many as times (StepTimes) says fit in a step of step_target seconds (None:
    1.75 times the decoding rows' own time, step_time.py, and at least the load's share: load_share), and at least
    a block's worth, so that every prompt goes on. A request that needs a KV block when none is free preempts the
    most recently admitted one, whose blocks are freed and which is computed again (prompt and tokens so far) when
    it is admitted again. stats: the engine's counters."""

    def __init__(self, pool: BlockPool, max_batch_size: int, max_tokens: int, prefill_chunk: int, stats: dict,
                 step_target: float | None = None):
        self.pool, self.max_batch_size, self.stats = pool, max_batch_size, stats
        self.max_tokens, self.prefill_chunk, self.step_target = max_tokens, prefill_chunk, step_target
        self.times = StepTimes()  # the engine tells it how long each step took
        self.admitted: deque[int] = deque(maxlen=LOAD_WINDOW)  # prompt tokens admitted in each of the last steps
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order they were admitted

    def schedule(self) -> list[tuple[Request, int]]:
        """This step's rows: (request, how many of its pending tokens it computes), each with the KV blocks for
        them; the one-token rows first (the model runner's layout)."""
        budget, rows, preemptions = self.max_tokens, [], self.stats["preemptions"]
        decoding = [r for r in self.running if r.n_pending == 1]  # first: clients wait on them
        for r in decoding:
            if self.reserve(r, 1):
                rows.append((r, 1))
                budget -= 1
        rows = [(r, n) for r, n in rows if r in self.running]  # a later row's blocks may have preempted it
        others = self.others_budget(len(rows), budget)  # tokens of the rows that are not one-token rows
        for r in [r for r in self.running if r.n_pending > 1]:
            n = min(r.n_pending, self.prefill_chunk, others)
            if n and self.reserve(r, n):
                rows.append((r, n))
                others -= n
        rows = [(r, n) for r, n in rows if r in self.running]
        # no admission in a step that had to preempt: the pool is full, and whoever is let in would be next out
        admitted = 0
        while others and self.stats["preemptions"] == preemptions and (r := self.admit()):
            admitted += r.n_pending
            n = min(r.n_pending, self.prefill_chunk, others)
            if not self.reserve(r, n):  # its prefix's cached blocks left too few free: it waits for the next step
                break
            rows.append((r, n))
            others -= n
        self.admitted.append(admitted)
        for i, (r, n) in enumerate(rows):  # what is left: drafts of speculating requests
            if r.lookup and n == r.n_pending == 1 and others:
                r.draft = self.draft(r, others)
                rows[i] = (r, 1 + len(r.draft))
                others -= len(r.draft)
        return sorted(rows, key=lambda row: row[1] > 1)

    def others_budget(self, decoding_rows: int, budget: int) -> int:
        """The tokens a step may give to prompt chunks and drafts beside decoding_rows one-token rows: what is left
        of the token budget, and no more than fits in the step's time target; but at least a block, so that prompts
        go on however slow the decoding rows are, and with the default target at least the load's share, so that
        prompts are read as fast as they come, a little in every step rather than much in a few."""
        fit = self.times.tokens_within(decoding_rows, self.step_target)
        if fit is None:
            return budget
        least = max(self.pool.block_size, self.load_share() if self.step_target is None else 0)
        return min(budget, max(fit, least))

    def load_share(self) -> int:
        """LOAD_MARGIN times the prompt tokens admitted per step over the last LOAD_WINDOW steps (a prompt less what
        the prefix cache held; a preempted request's every token again): what each step must read for prompts to
        keep up with the load. On tinyllama with 4 in flight on a 2-core CPU, gathering them into fewer, longer
        steps made one gap in nine more than twice the median; spreading them, one in a hundred. And at least a
        BACKLOG_STEPS-th of the prompt tokens still to read by the running requests and by the waiting ones the
        batch has room for: a burst of prompts arriving together is read in a few dozen steps, not at the pace of
        the load that follows it."""
        room = max(self.max_batch_size - len(self.running), 0)
        backlog = sum(r.n_pending for r in (*self.running, *itertools.islice(self.waiting, room)) if r.n_pending > 1)
        return math.ceil(max(LOAD_MARGIN * sum(self.admitted) / LOAD_WINDOW, backlog / BACKLOG_STEPS))

    def draft(self, r: Request, budget: int) -> list[int]:
        """The tokens prompt lookup proposes to follow a speculating request's next one, at most budget and only
        with free blocks for them (a proposal never preempts anybody)."""
        k = min(r.speculation[1], budget, r.max_tokens - len(r.output) - 1)
        draft = r.lookup.follow(k) if k > 0 else None
        bs = self.pool.block_size
        if not draft or -(-(r.n_computed + 1 + len(draft)) // bs) - len(r.blocks) > self.pool.n_free:
            return []
        self.reserve(r, 1 + len(draft))
        return draft

    def admit(self) -> Request | None:
        """The first waiting request, now running, if the batch has room and (when others run) the pool has the
        blocks for its first chunk."""
        if not self.waiting or len(self.running) >= self.max_batch_size:
            return None
        bs = self.pool.block_size
        r = self.waiting[0]
        if (s := r.shares_prompt_with) and s.finish_reason is None and s.n_computed < len(s.prompt) - 1:
            return None  # it waits one or a few steps for the prompt it shares to be cached, and then reuses it
        first_chunk = -(-min(len(r.tokens), self.prefill_chunk) // bs)
        if self.running and self.pool.n_free < first_chunk:
            return None
        self.waiting.popleft()
        # the last token is computed: it gives the logits; a prompt to score is computed whole, for its logits
        scored = r.prompt_logprobs is None or len(r.prompt_token_logprobs) == len(r.prompt) - 1
        r.blocks, r.digests = self.pool.match(r.tokens[:-1]) if scored else ([], [])
        r.n_computed = len(r.blocks) * bs
        if r.first_token_time is None:
            r.cached_tokens = r.n_computed
        self.stats["prefix_cache_hit_tokens"] += r.n_computed
        self.running.append(r)
        return r

    def reserve(self, r: Request, n: int) -> bool:
        """Blocks for n more tokens of r, preempting the most recently admitted requests while the pool is empty.
        Whether r still runs (it may have been the one preempted)."""
        bs = self.pool.block_size
        while r in self.running and len(r.blocks) * bs < r.n_computed + n:
            block = self.pool.allocate()
            if block is None:
                self.preempt(self.running[-1])
            else:
                r.blocks.append(block)
        return r in self.running

    def preempt(self, r: Request):
        self.pool.release(r.blocks)
        r.blocks, r.digests, r.n_computed = [], [], 0
        self.running.remove(r)
        self.waiting.appendleft(r)
        self.stats["preemptions"] += 1

    def computed(self, rows: list[tuple[Request, int]]):
        """n more tokens of each (row, n) are in the cache: full blocks become reusable by a later prompt."""
        bs = self.pool.block_size
        for r, n in rows:
            r.n_computed += n
            tokens = r.tokens + r.draft if r.draft else r.tokens  # a verified draft's tokens are not appended yet
            for i in range(len(r.digests), r.n_computed // bs):
                digest = block_digest(r.digests[-1] if r.digests else b"", tokens[i * bs:(i + 1) * bs])
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
