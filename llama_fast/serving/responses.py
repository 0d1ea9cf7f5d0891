"""The OpenAI API's answers (serve.py): the JSON of a completion or a chat completion, whole or as stream chunks,
with logprobs, usage and tool calls."""
import itertools

from llama_fast.chat.tool_calls import openai_tool_calls

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


def chat_response(body, requests: list, tokenizer, head: dict, tool_format=None) -> dict:
    """tool_format: how the model writes tool calls (chat/tool_calls.py), when the request may call tools."""
    choices = []
    for i, r in enumerate(requests):
        message, finish_reason = {"role": "assistant", "content": r.text, "refusal": None}, r.finish_reason
        content, calls = tool_format.parse(r.text) if tool_format else (r.text, [])
        if calls:  # what the model wrote was calls: the client runs them and answers with role "tool"
            message, finish_reason = {**message, "content": content, "tool_calls": openai_tool_calls(calls)}, \
                "tool_calls"
        choices.append({"index": i, "message": message, "finish_reason": finish_reason,
                        "logprobs": chat_logprobs(tokenizer, scored_output(r)) if body.logprobs else None})
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(requests, body.n)}


class ToolCallStream:
    """A streamed choice that may call tools: its text goes out as content while it cannot be the start of calls;
    the rest is held back to the end, then sent as tool_calls if it is calls (else as the content it was)."""

    def __init__(self, tool_format, required: bool):
        self.format, self.required, self.text, self.sent = tool_format, required, "", 0

    def push(self, text: str) -> str:
        """The content to send now."""
        self.text += text
        ready = 0 if self.required else self.format.content_length(self.text)
        out, self.sent = self.text[self.sent:max(ready, self.sent)], max(ready, self.sent)
        return out

    def finish(self) -> tuple[str, list]:
        """(the content still to send, the calls)."""
        content, calls = self.format.parse(self.text)
        return ("", calls) if calls else (self.text[self.sent:], [])


def tool_call_deltas(calls: list) -> list[dict]:
    """Stream deltas of tool calls, as OpenAI streams them: each call's id, type and name first, then its
    arguments (here in one piece, once the call is whole)."""
    deltas = []
    for index, call in enumerate(openai_tool_calls(calls)):
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    return deltas


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
               head: dict, offset: int = 0, tools: ToolCallStream | None = None) -> list:
    """tools: the choice's ToolCallStream when the request may call tools."""
    head = {**head, "object": "chat.completion.chunk"}
    events, calls = [], []
    if first:
        events.append({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
    if tools is not None:
        text = tools.push(text)
        if finish_reason:
            rest, calls = tools.finish()
            text += rest
    if text or finish_reason or scored:
        delta = {"content": text} if text else {}
        logprobs = chat_logprobs(tokenizer, scored) if body.logprobs else None
        events.append({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": None if calls else finish_reason}]})
    for n, delta in enumerate(tool_call_deltas(calls)):
        events.append({**head, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                            "finish_reason": "tool_calls" if n == 2 * len(calls) - 1 else None}]})
    return events


def usage_chunk(body, requests: list, head: dict, chat: bool) -> dict:
    return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
            "usage": usage(requests, body.n)}
