"""The OpenAI API's requests (serve.py): what a client may send, checked field by field (a wrong type or range is a
400 naming the field); responses.py writes the answers.

Every field is either acted on or refused by name (README, Serving: the field table); a field OpenAI does not have
is a 400 naming it, as OpenAI answers; null means "the default" wherever OpenAI accepts it. Fields beyond OpenAI's,
as vLLM has them: top_k, min_p, repetition_penalty, ignore_eos; and ours, speculation.
"""
import json
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_fast.serving.engine import EngineConfig
from llama_fast.serving.request import MAX_LOGPROBS, MAX_LOOKUP
from sampling import SamplingConfig

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat defaults to the rest of the context
MAX_CHOICES = 64  # choices one HTTP request may ask for (n times the prompts): each is a request to the engine
# OpenAI's fields this server does not act on, refused when given a value other than OpenAI's default (or null);
# a request model that has one of them (ChatRequest: tools) acts on it instead
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

    def calls_tools(self) -> str | None:
        return None  # completions have no tools; ChatRequest's may

    def tool_dicts(self) -> list[dict] | None:
        return None


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


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class Function(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # a required call's arguments always validate here, strict or not


class Tool(Strict):
    type: Literal["function"]
    function: Function


class FunctionName(Strict):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant's message that only calls tools
    name: str | None = None  # given to the chat template, which may show it
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, as this server returned them
    tool_call_id: str | None = None  # a tool's answer: to which call
    refusal: None = None  # null, as an answer's message has it when a client sends the message back

    @model_validator(mode="after")
    def fields_of_its_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: missing (only an assistant's message with tool_calls may have none)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant's message has them")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("tool_call_id: a tool's message has one (the call it answers), and only it")
        return self

    def as_dict(self) -> dict:
        """As chat templates take a message (transformers' convention): a call's arguments as an object."""
        text = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        extra = {k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id)) if v is not None}
        if self.tool_calls:
            extra["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": arguments_object(c.function.arguments)}} for c in self.tool_calls]
        return {"role": "system" if self.role == "developer" else self.role, "content": text, **extra}


def arguments_object(arguments: str):
    """A call's arguments as an object for the template (Qwen's writes them with tojson); text that is not a JSON
    object stays text."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def choices(self):
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be at least 1")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: two functions of one name")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no function {self.tool_choice.function.name!r} in tools")
        if self.calls_tools() and self.structured():
            raise ValueError("response_format: a reply is either tool calls or the JSON asked for, not both")
        if self.calls_tools() and self.ignore_eos:
            raise ValueError("ignore_eos: a reply with tools ends where the model ends it")
        return self

    def calls_tools(self) -> str | None:
        """How this request may call its tools: "auto" (if the model chooses), "required" (one call or more),
        "named" (that function, once); None: it does not."""
        if not self.tools or self.tool_choice == "none":
            return None
        return "named" if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice or "auto"

    def tool_dicts(self) -> list[dict] | None:
        """The tools as the chat template shows them (OpenAI's shape, as transformers passes them); none with
        tool_choice "none", so the model does not try to call them."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.calls_tools() else None

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

    def tool_dicts(self) -> None:
        return None


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]
