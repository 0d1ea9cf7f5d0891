"""A request to the serving engine, its state as the engine computes it (nano-vllm's Sequence), and what one may ask
(check_request)."""
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from sampling import SamplingConfig

if TYPE_CHECKING:
    from llama_fast.serving.grammar import Matcher

GREEDY = SamplingConfig(temperature=0)
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOOKUP = 16  # the longest prompt-lookup n-gram and proposal
MAX_LOGPROBS = 20  # the most alternatives a token's logprobs list (OpenAI's limit)


@dataclass(eq=False)
class Request:
    """One prompt to complete. on_output(request, text, token_ids) is called (from the engine's thread) with what
    each step added; request.finish_reason is set when it is the last call: "stop" (EOS or a stop string),
    "length" (max_tokens), "abort" or "error" (then request.error says what failed)."""
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = GREEDY
    stop: tuple[str, ...] = ()  # text that ends the output (not included in it)
    eos_ids: tuple[int, ...] = ()  # tokens that end the output (not included in it)
    seed: int | None = None  # the request's own random generator: the same text whatever else runs beside it
    # prompt lookup: (n-gram length, tokens proposed per step); 0 or None: the engine's default; (0, k): off
    speculation: tuple[int, int] | None = None
    logprobs: int | None = None  # each output token's log probability and the top k alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo); prefix not reused
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling (not to the logprobs)
    grammar: "Matcher | None" = None  # structured output: the tokens its grammar allows (engine.grammars.matcher)
    shares_prompt_with: "Request | None" = None  # admitted once that one's prompt is cached: its blocks are reused
    on_output: Callable | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # the engine's state
    tokens: list[int] = field(default_factory=list)  # prompt, then output
    text: str = ""  # the output as text, cut before a stop string
    finish_reason: str | None = None
    error: str | None = None
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
        self.bias = None  # logit_bias as (token ids, biases) tensors on the engine's device
        self.lookup = None  # prompt lookup's index of the request's tokens (PromptLookup), while it speculates
        self.draft: list[int] = []  # tokens proposed for this step, verified by its forward pass
        self.verified: list[int] = []  # tokens accepted by each of the request's recent verifications
        # (logprob, [(token, logprob) of the top k]) of each output token, and of each prompt token after the first
        self.token_logprobs: list[tuple[float, list]] = []
        self.prompt_token_logprobs: list[tuple[float, list]] = []

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def n_pending(self) -> int:  # tokens to compute before the next one can be sampled
        return len(self.tokens) - self.n_computed

    @property
    def plain_greedy(self) -> bool:
        """Whether the next token is the argmax of the model's logits (what prompt lookup's verification assumes)."""
        return (self.sampling.greedy and not self.sampling.penalized and not self.logit_bias and self.logprobs is None
                and self.grammar is None)

    @property
    def reads_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and self.n_computed < len(self.prompt)


def n_logits(r: Request, n: int) -> int:
    """How many logits a forward pass computing n of r's tokens gives back: one after each token when it verifies a
    draft or scores its prompt, else one after the last (what its next token is sampled from)."""
    return n if r.draft or r.reads_prompt_logprobs else 1


def check_request(r: Request, vocab: int, context: int, kv_tokens: int, has_tokenizer: bool):
    """Raise ValueError (a client's mistake) if an engine with this vocabulary, context and KV cache (kv_tokens
    tokens in all) cannot serve the request."""
    n = len(r.prompt)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= context:
        raise ValueError(f"this model's maximum context length is {context} tokens; the prompt has {n}")
    if any(not 0 <= t < vocab for t in r.prompt):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if not isinstance(r.max_tokens, int) or r.max_tokens < 0:
        raise ValueError(f"max_tokens must be at least 0, not {r.max_tokens}")
    if n + r.max_tokens > context:
        raise ValueError(f"this model's maximum context length is {context} tokens; the request needs "
                         f"{n + r.max_tokens} ({n} in the prompt, {r.max_tokens} for the completion)")
    if n + r.max_tokens > kv_tokens:
        raise ValueError(f"the request needs {n + r.max_tokens} tokens of KV cache; the server's holds {kv_tokens}")
    if r.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer")
    if r.speculation is not None:
        check_lookup(*r.speculation)
    if r.seed is not None and not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]:  # the engine's thread would fail
        raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (64 bits), not {r.seed}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(r, name)
        if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_LOGPROBS):
            raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], not {k!r}")
    for token, bias in (r.logit_bias or {}).items():
        if not (isinstance(token, int) and 0 <= token < vocab and -100 <= bias <= 100):
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab}) and biases in [-100, 100], not "
                             f"{token!r}: {bias!r}")


def check_lookup(n_gram: int, k: int):
    """Prompt lookup's settings: n-grams of 0 (off) to MAX_LOOKUP tokens, 1 to MAX_LOOKUP tokens proposed."""
    if not (0 <= n_gram <= MAX_LOOKUP and 1 <= k <= MAX_LOOKUP):
        raise ValueError(f"prompt lookup: the n-gram length must be in [0, {MAX_LOOKUP}] and the tokens proposed "
                         f"per step in [1, {MAX_LOOKUP}], not {n_gram} and {k}")
