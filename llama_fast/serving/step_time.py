"""How long a step takes, learned from the steps the engine runs, so that the scheduler can keep the steps that
carry decoding rows near a time target (the inter-token latency its clients see): a prompt chunk beside decoding
rows makes each of them wait for it, and a budget in tokens cannot say how long that is (a token of tinyllama costs
ten times one of stories110M).

The model is the simplest that fits a step: the time of its decoding rows alone (one token each; it depends on how
many there are), plus a cost per token of the other rows (prompt chunks, drafts to verify). Both are medians of the
last WINDOW steps that measured them, so a slow step (a compile, a busy machine) moves neither far.

By default a step with decoding rows may take AUTO_TARGET times their own time. That alone would starve prompts
under a heavy load (on 2 cores, 16 rows of tinyllama decode in ~104 ms, and the 78 ms more allowed read ~27 prompt
tokens, where prompts 3.3 times as long as the outputs bring ~53 a step), so the scheduler also gives every such
step at least the prompt tokens the load brings (Scheduler.load_share), spread over the steps instead of gathered
into a few long ones."""
import math
import statistics
from collections import deque

WINDOW = 16  # steps each estimate is the median of
MIN_DECODE_SAMPLES = 3  # decode-only steps of a batch size before its time is trusted
# By default a step that reads prompt tokens beside decoding rows may take this many times their own time: below 2,
# so that with the estimate's error (a step took 0.87-1.09x its prediction, p10-p90, tinyllama on a 2-core CPU) the
# longest gaps between a client's tokens stay within twice the usual one
AUTO_TARGET = 1.75


class StepTimes:
    """Seconds a step takes: decode[d] for d one-token rows alone, and per_token for each token of the other rows
    beside them."""

    def __init__(self):
        self.decode: dict[int, deque] = {}  # rows -> the last WINDOW decode-only steps' seconds
        self.per_token: deque = deque(maxlen=WINDOW)

    def observe(self, decoding_rows: int, other_tokens: int, seconds: float):
        """A step of decoding_rows one-token rows and other_tokens tokens of longer rows took seconds."""
        if not other_tokens:
            if decoding_rows:
                self.decode.setdefault(decoding_rows, deque(maxlen=WINDOW)).append(seconds)
            return
        alone = self.decoding_time(decoding_rows) if decoding_rows else 0.0
        if alone is not None:
            self.per_token.append(max(seconds - alone, 0.0) / other_tokens)

    def decoding_time(self, rows: int) -> float | None:
        """The seconds of a step of `rows` one-token rows alone: measured at that batch size, else at the nearest
        measured one (a decode step's time changes slowly with its rows: it reads the same weights); None before
        any is measured."""
        known = [d for d, times in self.decode.items() if len(times) >= MIN_DECODE_SAMPLES]
        if not known:
            return None
        nearest = min(known, key=lambda d: (abs(d - rows), -d))
        return statistics.median(self.decode[nearest])

    def tokens_within(self, decoding_rows: int, target: float | None) -> int | None:
        """How many tokens of other rows fit beside decoding_rows one-token rows in a step of target seconds
        (None: AUTO_TARGET times the rows' own time). 0 while the cost of a token beside them is not known yet
        (the scheduler then gives a block: small steps, so the first ones to time them are short too). None, the
        step then bounded by its token budget alone, when no row decodes, the target is infinite, or no step of
        decoding rows alone has been timed yet (a burst: every row was reading its prompt until now)."""
        alone = self.decoding_time(decoding_rows) if decoding_rows else None
        if alone is None or target == math.inf:
            return None
        if len(self.per_token) < MIN_DECODE_SAMPLES:
            return 0
        per_token = statistics.median(self.per_token)
        room = (target if target is not None else AUTO_TARGET * alone) - alone
        return int(room / per_token) if per_token > 0 else None
