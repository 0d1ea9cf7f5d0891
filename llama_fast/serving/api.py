"""The OpenAI API's shapes (serve.py): what a client may send, checked field by field (a wrong type or range is a
400 naming the field), and the JSON the server answers with, whole or as stream chunks.

Fields beyond OpenAI's, as vLLM has them: top_k, min_p, repetition_penalty, ignore_eos; and ours, speculation.
Features we do not have (several choices, log probabilities, echo, suffix, logit bias, tools) are refused by name
rather than silently ignored.
"""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_fast.serving.engine import MAX_LOOKUP, EngineConfig
from sampling import SamplingConfig

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat defaults to the rest of the context


class StreamOptions(BaseModel):
    include_usage: bool = False


class Speculation(BaseModel):
    """The extension field "speculation": prompt lookup for this request (greedy requests without penalties; the
    output is what plain decoding gives). prompt_lookup 0: off."""
    model_config = ConfigDict(strict=True, extra="forbid")
    prompt_lookup: int = Field(ge=0, le=MAX_LOOKUP)
    k: int = Field(EngineConfig.speculate_k, ge=1, le=MAX_LOOKUP)


class Sampled(BaseModel):
    """The fields both endpoints share. Strict: "5" is not a number, true is not 1."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, lt=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks), as vLLM's
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    logit_bias: dict | None = None
    speculation: Speculation | None = None  # None: the server's default (serve.py --prompt_lookup)

    @model_validator(mode="after")
    def supported(self):
        refused = {"n": self.n != 1, "logprobs": self.logprobs not in (None, False),
                   "logit_bias": bool(self.logit_bias), **self.refused()}
        for name, given in refused.items():
            if given:
                raise ValueError(f"{name} is not supported by this server")
        if isinstance(self.stop, list) and (len(self.stop) > 4 or not all(self.stop)):
            raise ValueError("stop: at most 4 non-empty strings")
        if self.stop == "":
            raise ValueError("stop: an empty string")
        return self

    def refused(self) -> dict:
        return {}

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, max(self.top_k, 0), self.top_p, self.min_p, self.repetition_penalty,
                              self.frequency_penalty, self.presence_penalty)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refused(self) -> dict:
        return {"echo": self.echo, "suffix": bool(self.suffix), "best_of": self.best_of not in (None, 1),
                "several prompts": isinstance(self.prompt, list) and len(self.prompt) > 1
                and not isinstance(self.prompt[0], int)}

    def prompt_ids(self, tokenizer) -> list[int]:
        prompt = self.prompt[0] if isinstance(self.prompt, list) and self.prompt and \
            not isinstance(self.prompt[0], int) else self.prompt
        return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def max_tokens_for(self, room: int) -> int:
        return self.max_tokens if self.max_tokens is not None else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    response_format: dict | None = None

    def refused(self) -> dict:
        return {"tools": bool(self.tools), "response_format": self.response_format not in (None, {"type": "text"})}

    def prompt_ids(self, tokenizer) -> list[int]:
        return tokenizer.encode_chat([m.as_dict() for m in self.messages])

    def max_tokens_for(self, room: int) -> int:
        given = self.max_completion_tokens or self.max_tokens
        return given if given is not None else room


# ----------------------------------------------------------------------------------------------- responses

def usage(r) -> dict:
    return {"prompt_tokens": len(r.prompt), "completion_tokens": len(r.output),
            "total_tokens": len(r.prompt) + len(r.output)}


def completion_response(r, id: str, created: int, model: str) -> dict:
    choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(r)}


def chat_response(r, id: str, created: int, model: str) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
              "finish_reason": r.finish_reason}
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(r)}


def completion_chunk(r, text: str, finish_reason, first: bool, id: str, created: int, model: str,
                     include_usage: bool) -> list:
    """The stream events for one piece of text (none when there is no text and the request goes on)."""
    head = {"id": id, "object": "text_completion", "created": created, "model": model}
    events = []
    if text or finish_reason:
        events.append({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                            "finish_reason": finish_reason}]})
    if finish_reason and include_usage:
        events.append({**head, "choices": [], "usage": usage(r)})
    return events


def chat_chunk(r, text: str, finish_reason, first: bool, id: str, created: int, model: str,
               include_usage: bool) -> list:
    head = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    events = []
    if first:
        events.append({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
    if text or finish_reason:
        delta = {"content": text} if text else {}
        events.append({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish_reason}]})
    if finish_reason and include_usage:
        events.append({**head, "choices": [], "usage": usage(r)})
    return events
