"""Tool calls: how a chat model writes a call to one of the functions a request offers (OpenAI's `tools`), read
back from its text, enforced by a grammar when a call is required, and streamed as OpenAI streams tool_calls.

The format is the model family's, told apart by the chat template that shows the model its tools:
  hermes       Qwen2.5, Qwen3 (and Hermes): <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one per call
  llama3_json  Llama-3.1/3.2/3.3: the reply is {"name": ..., "parameters": {...}}, calls separated by ";"
A template that shows tools in neither format is not one this server can read calls from: tools are refused.

    fmt = tool_call_format(template)
    content, calls = fmt.parse(text)          # calls: [(name, arguments dict)]; none unless the text is calls
    fmt.content_length(text)                  # how much a stream may send as content: the rest may become calls
(serving/grammar.py's Grammars.tool_matcher enforces the format when a call is required.)
"""
import json
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    begin: str  # before each call's JSON
    end: str  # after it
    separator: str  # between two calls
    arguments: str  # the key the arguments are under

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
        """(the content before the calls, or None; the calls). Text that is not wholly well-formed calls after its
        content is all content, with no calls (a model that starts a call and breaks it has said something)."""
        head, calls = (split_tagged if self.begin else split_json)(self, text)
        if not calls:
            return text, []
        return (head if head.strip() else None), calls

    def content_length(self, text: str) -> int:
        """How much of a reply so far is content whatever follows (a stream sends it and holds the rest back):
        hermes, what comes before <tool_call> or the start of one; llama3_json, nothing while the reply may
        still be a call, all once it cannot."""
        if self.begin:
            tag = self.begin.strip()
            if tag in text:
                return text.index(tag)
            return len(text) - max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)
        stripped = text.lstrip()
        if not stripped or PYTHON_TAG.startswith(stripped) or stripped.removeprefix(PYTHON_TAG).lstrip()[:1] in "{":
            return 0
        return len(text)


PYTHON_TAG = "<|python_tag|>"  # Llama-3.1 writes it before a call (code interpreter) sometimes
HERMES = ToolCallFormat("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments")
LLAMA3_JSON = ToolCallFormat("llama3_json", "", "", "; ", "parameters")


def tool_call_format(template) -> ToolCallFormat | None:
    """The format a chat template (chat/templates.py) teaches its model to call tools in, or None: it shows no
    tools (Meta's built-in formats, most base models' templates), or not in a format read here."""
    if template is None or not template.takes_tools:
        return None
    if "<tool_call>" in template.source:
        return HERMES
    if '"parameters"' in template.source or PYTHON_TAG in template.source:
        return LLAMA3_JSON
    return None


def split_tagged(fmt: ToolCallFormat, text: str) -> tuple[str, list]:
    """hermes: content, then <tool_call> JSON </tool_call> blocks and nothing else (the last may lack its end tag:
    the model stopped there)."""
    begin, end = fmt.begin.strip(), fmt.end.strip()
    at = text.find(begin)
    if at < 0:
        return text, []
    calls, rest = [], text[at:]
    while rest.strip():
        if not rest.lstrip().startswith(begin):  # words between or after the calls
            return text, []
        body, _, rest = rest.lstrip()[len(begin):].partition(end)
        call = read_call(fmt, body)
        if call is None:
            return text, []
        calls.append(call)
    return text[:at], calls


def split_json(fmt: ToolCallFormat, text: str) -> tuple[str, list]:
    """llama3_json: the whole reply is calls, each a JSON object, separated by ";"."""
    rest, calls, decoder = text.strip().removeprefix(PYTHON_TAG), [], json.JSONDecoder()
    while rest.strip():
        rest = rest.strip().removeprefix(";").strip()
        try:
            value, at = decoder.raw_decode(rest)
        except ValueError:
            return text, []
        call = call_of(fmt, value)
        if call is None:
            return text, []
        calls.append(call)
        rest = rest[at:]
    return "", calls


def read_call(fmt: ToolCallFormat, body: str) -> tuple[str, dict] | None:
    try:
        return call_of(fmt, json.loads(body))
    except ValueError:
        return None


def call_of(fmt: ToolCallFormat, value) -> tuple[str, dict] | None:
    """(name, arguments) of a call's JSON, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(fmt.arguments, value.get("arguments", {}))  # Llama-3 models write either key
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def openai_tool_calls(calls: list[tuple[str, dict]]) -> list[dict]:
    """OpenAI's tool_calls: each with an id the client answers with (role "tool", tool_call_id), and the arguments
    as a JSON string."""
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
            for name, arguments in calls]
