"""The OpenAI API's shapes (serve.py): what a client may send, checked field by field (a wrong type or range is a
400 naming the field), and the JSON the server answers with, whole or as stream chunks.

Every field is either acted on or refused by name (README, Serving: the field table); a field OpenAI does not have
is a 400 naming it, as OpenAI answers; null means "the default" wherever OpenAI accepts it. Fields beyond OpenAI's,
as vLLM has them: top_k, min_p, repetition_penalty, ignore_eos; and ours, speculation.
"""
import itertools
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_fast.serving.engine import MAX_LOGPROBS, MAX_LOOKUP, EngineConfig
from sampling import SamplingConfig

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat defaults to the rest of the context
MAX_CHOICES = 64  # choices one HTTP request may ask for (n times the prompts): each is a request to the engine
# OpenAI's fields this server does not act on, refused when given a value other than OpenAI's default (or null)
REFUSED = {"suffix": None, "best_of": 1, "tools": [], "tool_choice": "none", "parallel_tool_calls": True,
           "functions": [], "function_call": "none", "audio": None, "modalities": ["text"], "prediction": None,
           "reasoning_effort": None, "web_search_options": None, "store": False, "metadata": {},
           "service_tier": "auto", "verbosity": None, "prompt_cache_key": None, "safety_identifier": None}


class Strict(BaseModel):
    """Strict: "5" is not a number, true is not 1; a field the model does not have is an error naming it."""
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Speculation(Strict):
    """The extension field "speculation": prompt lookup for this request (greedy requests without penalties; the
    output is what plain decoding gives). prompt_lookup 0: off."""
    prompt_lookup: int = Field(ge=0, le=MAX_LOOKUP)
    k: int = Field(EngineConfig.speculate_k, ge=1, le=MAX_LOOKUP)


class JSONSchema(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # the output always validates here, strict or not


class ResponseFormat(Strict):
    """Structured output: "json_object" (any JSON object) or "json_schema" (one that validates against it)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema goes with type "json_schema", and only with it')
        return self


class Sampled(Strict):
    """The fields both endpoints share."""
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, lt=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None  # choice i of n draws with seed + i
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks), as vLLM's
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> a bias in [-100, 100]
    user: str | None = None  # accepted, no effect: it identifies an end user to OpenAI's abuse monitoring
    speculation: Speculation | None = None  # None: the server's default (serve.py --prompt_lookup)
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def defaults_for_nulls(cls, data):
        """null is the default (as OpenAI takes it) for every field that has one; a REFUSED field given another
        value than OpenAI's default is refused by name."""
        if not isinstance(data, dict):
            return data
        for name, default in REFUSED.items():
            if name not in cls.model_fields and data.get(name, default) not in (None, default):
                raise ValueError(f"{name} is not supported by this server")
        defaulted = {k for k, field in cls.model_fields.items() if not field.is_required()}
        set_aside = set(REFUSED) - set(cls.model_fields)
        return {k: v for k, v in data.items() if k not in set_aside and not (v is None and k in defaulted)}

    @model_validator(mode="after")
    def supported(self):
        if isinstance(self.stop, list) and (len(self.stop) > 4 or not all(self.stop)):
            raise ValueError("stop: at most 4 non-empty strings")
        if self.stop == "":
            raise ValueError("stop: an empty string")
        if self.structured() and self.ignore_eos:
            raise ValueError("ignore_eos: structured output ends where its JSON does")
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit() or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: keys are token ids and values in [-100, 100], not {token!r}: {bias}")
        return self

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, max(self.top_k, 0), self.top_p, self.min_p, self.repetition_penalty,
                              self.frequency_penalty, self.presence_penalty)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def structured(self) -> tuple[dict | None] | None:
        """(the JSON schema, or None for any JSON object) when the output must be JSON; else None."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        return (fmt.json_schema.schema_ if fmt.json_schema else None,)

    def bias(self) -> dict[int, float] | None:
        return {int(token): bias for token, bias in self.logit_bias.items()} if self.logit_bias else None


class CompletionRequest(Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False  # the prompt before the completion (with logprobs: its tokens' too, the first null)
    add_special_tokens: ClassVar[bool] = True  # what tokenize() asks of /tokenize's requests too
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's, and this many alternatives

    @model_validator(mode="after")
    def choices(self):
        if not self.prompt:
            raise ValueError("prompt: empty")
        if self.n * len(self.prompts()) > MAX_CHOICES:
            raise ValueError(f"n times the prompts may be at most {MAX_CHOICES}")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 only with echo (scoring the prompt)")
        return self

    def prompts(self) -> list:
        """The prompts, each a string or token ids."""
        batched = isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
        return list(self.prompt) if batched else [self.prompt]

    def max_tokens_for(self, room: int) -> int:
        return self.max_tokens if self.max_tokens is not None else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)

    def token_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # given to the chat template, which may show it

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        named = {"name": self.name} if self.name is not None else {}
        return {"role": "system" if self.role == "developer" else self.role, "content": text, **named}


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def choices(self):
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be at least 1")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs true")
        return self

    def prompts(self) -> list:
        return [[m.as_dict() for m in self.messages]]

    def max_tokens_for(self, room: int) -> int:
        given = self.max_completion_tokens or self.max_tokens
        return given if given is not None else room

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_logprobs(self) -> int | None:
        return None


class TokenizeRequest(Strict):
    """POST /tokenize (as vLLM's): a prompt's token ids, or a conversation's through the chat template."""
    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # BOS first, as a completion's prompt has it (lm-eval's remote tokenizer: false)
    messages: list[Message] | None = None
    echo: ClassVar[bool] = False  # what tokenize() asks of a completion request
    n: ClassVar[int] = 1

    @model_validator(mode="after")
    def one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        return self

    def prompts(self) -> list:
        return [self.prompt] if self.messages is None else [[m.as_dict() for m in self.messages]]


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------------------------- responses
# A choice's tokens with their logprobs, "scored": [(token, logprob, [(token, logprob)] of the top alternatives)];
# the first prompt token has no logprob (None, None).

def scored_prompt(r) -> list[tuple]:
    return [(r.prompt[0], None, None)] + [(t, lp, top) for t, (lp, top) in zip(r.prompt[1:], r.prompt_token_logprobs)]


def scored_output(r, start: int = 0, stop: int | None = None) -> list[tuple]:
    """The output tokens start:stop with their logprobs, but not an end-of-sequence token that ended the output
    (its text is not in the output either)."""
    shown = len(r.output) - (r.finish_reason == "stop" and bool(r.output) and r.output[-1] in r.eos_ids)
    stop = shown if stop is None else min(stop, shown)
    return [(t, lp, top) for t, (lp, top) in zip(r.output[start:stop], r.token_logprobs[start:stop])]


def token_string(tokenizer, token: int) -> str:
    """A token's text, or (part of a character) its bytes written "bytes:\\xe2\\x80", as OpenAI writes them."""
    data = tokenizer.token_bytes(token)
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def completion_logprobs(tokenizer, scored: list[tuple], offset: int) -> dict:
    """The legacy completions' logprobs: parallel lists; text_offset: offset plus the lengths of the tokens before
    (as vLLM counts them: a control token's name counts, so it can differ from the text's own positions)."""
    tokens = [token_string(tokenizer, t) for t, _, _ in scored]
    offsets = list(itertools.accumulate(map(len, tokens[:-1]), initial=offset))[:len(tokens)]
    tops = [None if top is None else {token_string(tokenizer, t): lp for t, lp in top} for _, _, top in scored]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in scored], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tokenizer, scored: list[tuple]) -> dict:
    def entry(token, logprob):
        data = tokenizer.token_bytes(token)
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(*alt) for alt in top]} for t, lp, top in scored],
            "refusal": None}


def usage(requests: list, n: int) -> dict:
    """Each prompt counted once (a prompt's n choices share it), with how many of its tokens the prefix cache
    held."""
    firsts = requests[::n]
    prompt, completion = sum(len(r.prompt) for r in firsts), sum(len(r.output) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)}}


def completion_response(body, requests: list, echoed: list[str], tokenizer, head: dict) -> dict:
    """echoed: each choice's prompt text ("" without echo)."""
    choices = []
    for i, (r, prompt_text) in enumerate(zip(requests, echoed)):
        logprobs = None
        if body.logprobs is not None:
            scored = (scored_prompt(r) if body.echo else []) + scored_output(r)
            logprobs = completion_logprobs(tokenizer, scored, 0 if body.echo else len(tokenizer.decode(r.prompt)))
        choices.append({"index": i, "text": prompt_text + r.text, "logprobs": logprobs,
                        "finish_reason": r.finish_reason})
    return {**head, "object": "text_completion", "choices": choices, "usage": usage(requests, body.n)}


def chat_response(body, requests: list, tokenizer, head: dict) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": chat_logprobs(tokenizer, scored_output(r)) if body.logprobs else None,
                "finish_reason": r.finish_reason} for i, r in enumerate(requests)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(requests, body.n)}


def completion_chunk(body, i: int, r, text: str, scored: list, finish_reason, first: bool, echoed: str,
                     tokenizer, head: dict, offset: int = 0) -> list:
    """The stream events of choice i for one piece of text and the tokens it came from (none when there is no
    text and the request goes on); the first carries the echoed prompt. offset: its first token's text_offset."""
    if first and body.echo:
        text = echoed + text
        scored = (scored_prompt(r) if body.logprobs is not None else []) + scored
    if not (text or finish_reason or scored):
        return []
    logprobs = completion_logprobs(tokenizer, scored, offset) if body.logprobs is not None else None
    return [{**head, "object": "text_completion",
             "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}]


def chat_chunk(body, i: int, r, text: str, scored: list, finish_reason, first: bool, echoed: str, tokenizer,
               head: dict, offset: int = 0) -> list:
    head = {**head, "object": "chat.completion.chunk"}
    events = []
    if first:
        events.append({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
    if text or finish_reason or scored:
        delta = {"content": text} if text else {}
        logprobs = chat_logprobs(tokenizer, scored) if body.logprobs else None
        events.append({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish_reason}]})
    return events


def usage_chunk(body, requests: list, head: dict, chat: bool) -> dict:
    return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
            "usage": usage(requests, body.n)}
