"""Tool calling (OpenAI's tools, tool_choice, tool messages) on a Qwen2 test model with Qwen2.5's chat template: the
template shows the tools and the call history exactly as transformers' apply_chat_template does; a required or
named call always validates against its function's parameters (jsonschema), in both formats read here; "auto"
answers what the model writes for the prompt transformers renders, as calls when it writes calls; a streamed
answer adds up to the whole one; every refusal is a 400 naming the field."""
import json

import httpx
import jsonschema
import openai
import pytest
from helpers import KEY, ServerProcess

from decoding import generate
from llama_fast.chat.templates import chat_template
from llama_fast.chat.tool_calls import HERMES, LLAMA3_JSON
from llama_fast.serving.engine import Engine, EngineConfig
from llama_fast.serving.request import Request
from llama_fast.serving.responses import ToolCallStream
from sampling import SamplingConfig
from tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}}}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [{"role": "system", "content": "You are terse."}, *ASK,
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris", "unit": "celsius"}'}},
               {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
           {"role": "tool", "tool_call_id": "call_2", "content": "5"},
           {"role": "user", "content": "And tomorrow?"}]


def for_template(messages: list) -> list:
    """The messages as transformers' templates take them: a call's arguments as an object."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


@pytest.fixture(scope="module")
def qwen(qwen_tools_checkpoint, load_cpu):
    """(folder, tokenizer, model)."""
    d = qwen_tools_checkpoint
    return d, load_tokenizer(d / "tokenizer.json"), load_cpu(d)


@pytest.fixture(scope="module")
def server(qwen):
    s = ServerProcess(qwen[0], "--api_key", KEY, "--model_name", "qwen")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


# ------------------------------------------------------------------------------------------------ in process

@pytest.mark.parametrize("messages", [ASK, HISTORY])
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_the_template_shows_tools_as_transformers_does(qwen, messages, tools):
    from transformers import AutoTokenizer

    auto, ours = AutoTokenizer.from_pretrained(qwen[0]), chat_template(qwen[1])
    messages = for_template(messages)
    expected = auto.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours.render(messages, tools=tools) == expected
    ids = auto.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    assert ours.encode(messages, tools=tools) == list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', None, [("add", {"a": 1, "b": 2})]),
    ('Let me look.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", '
     '"arguments": {"x": [1]}}\n</tool_call>', "Let me look.\n", [("f", {}), ("g", {"x": [1]})]),
    ('<tool_call>\n{"name": "f", "arguments": {}}', None, [("f", {})]),  # stopped before its end tag
    ('<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>', None, []),  # broken: all content
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> and then some', None, []),
    ("No call here, only <tool_ in text", None, []),
])
def test_hermes_calls_are_read_back(text, content, calls):
    assert HERMES.parse(text) == ((content, calls) if calls else (text, []))


@pytest.mark.parametrize("text, calls", [
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),
    ('<|python_tag|>{"name": "f", "arguments": {}}; {"name": "g", "parameters": {"x": 1}}',
     [("f", {}), ("g", {"x": 1})]),
    ('The answer is {"name": "f"}', []),
    ('{"name": "f", "parameters": [1]}', []),
    ('{"name": "f", "parameters": {}} trailing words', []),
])
def test_llama3_json_calls_are_read_back(text, calls):
    assert LLAMA3_JSON.parse(text) == ((None, calls) if calls else (text, []))


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON])
@pytest.mark.parametrize("text", ['Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": "<tool_call>"}}\n</tool_call>',
                                  '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {}}',
                                  "Plain words < and { and <tool and more", " <|python_tag|> oops"])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_a_stream_sends_what_the_whole_answer_has(fmt, text, step):
    """Pushed piece by piece, a stream sends as content exactly the whole answer's content, and the same calls."""
    stream, sent = ToolCallStream(fmt, required=False), ""
    for at in range(0, len(text), step):
        sent += stream.push(text[at:at + step])
    rest, calls = stream.finish()
    content, expected_calls = fmt.parse(text)
    assert (sent + rest, calls) == (content or "", expected_calls)


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON])
@pytest.mark.parametrize("named, parallel", [(None, False), ("add", False), (None, True)])
def test_required_calls_always_validate(qwen, fmt, named, parallel):
    """Sampled at temperature 1 from random weights, under the grammar, every reply is calls of the tools offered
    whose arguments validate against their parameters; named: that function, once."""
    _, tok, model = qwen
    engine = Engine(model, tok, EngineConfig(block_size=8, max_batch_size=8))
    prompt = chat_template(tok).encode(ASK, tools=TOOLS)
    requests = [Request(prompt, 320, SamplingConfig(temperature=1.0), (), tuple(tok.eos_ids), seed)
                for seed in range(8)]
    for r in requests:
        r.grammar = engine.grammars.tool_matcher(fmt, TOOLS, named, parallel)
        engine.add(r)
    while engine.has_work():
        engine.step()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    complete = 0
    for r in requests:
        content, calls = fmt.parse(r.text)
        if r.finish_reason == "length":
            continue  # cut off mid-call: not a whole call (but never one that validates wrongly)
        complete += 1
        assert content is None and calls, r.text
        assert len(calls) == 1 or (parallel and named is None)
        for name, arguments in calls:
            assert name == (named or name) and name in schemas
            jsonschema.validate(arguments, schemas[name])
    assert complete >= 6


# ------------------------------------------------------------------------------------------------ the server

def greedy_text(qwen, messages, tools, n=40) -> tuple[str, bool]:
    """What the model answers, greedy, to the prompt transformers renders; whether it ended it."""
    from transformers import AutoTokenizer

    d, tok, model = qwen
    ids = AutoTokenizer.from_pretrained(d).apply_chat_template(for_template(messages), tools=tools,
                                                               add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    result = generate(model, [ids], n, SamplingConfig(temperature=0), tok.eos_ids)
    return tok.decode([t for t in result.tokens[0] if t not in tok.eos_ids]), result.stopped[0]


@pytest.mark.parametrize("messages", [ASK, HISTORY])
def test_auto_answers_what_the_model_writes(client, qwen, messages):
    out = client.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, max_tokens=40, temperature=0)
    text, stopped = greedy_text(qwen, messages, TOOLS)
    content, calls = HERMES.parse(text)
    choice = out.choices[0]
    assert choice.message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []] == calls
    assert choice.finish_reason == ("tool_calls" if calls else "stop" if stopped else "length")
    none = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=40,
                                          temperature=0)  # the tools are not shown: the model cannot try to call them
    assert none.choices[0].message.content == greedy_text(qwen, ASK, None)[0]
    assert not none.choices[0].message.tool_calls


def streamed_calls(client, **kwargs) -> tuple:
    """(content, [(name, arguments)], finish_reason) added up from a stream, as OpenAI's clients add them up."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = choice.finish_reason or finish
    assert all(c["id"].startswith("call_") for c in calls.values())
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_calls_through_the_server(client, choice):
    kwargs = dict(model="qwen", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=0,
                  parallel_tool_calls=False)
    out = client.chat.completions.create(**kwargs).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None and len(out.message.tool_calls) == 1
    call = out.message.tool_calls[0]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    content, calls, finish = streamed_calls(client, **kwargs)
    assert (content, calls, finish) == ("", [(call.function.name, json.loads(call.function.arguments))], "tool_calls")


def test_a_call_answered_goes_on_as_clients_send_it(client, qwen):
    """The pattern of OpenAI's documentation: the answer's message appended as it is (the client sends its fields
    back, nulls included), then the tool's result; the next answer is what the model writes for that history as
    transformers renders it."""
    messages = list(ASK)
    out = client.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, temperature=0)
    call = out.choices[0].message.tool_calls[0]
    messages += [out.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    again = client.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, max_tokens=40, temperature=0)
    plain = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]}, messages[-1]]
    text, _ = greedy_text(qwen, plain, TOOLS)
    assert again.choices[0].message.content == HERMES.parse(text)[0]


def test_streamed_auto_adds_up_to_the_whole_answer(client):
    kwargs = dict(model="qwen", messages=HISTORY, tools=TOOLS, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = streamed_calls(client, **kwargs)
    assert content == (whole.message.content or "") and finish == whole.finish_reason
    assert calls == [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]


@pytest.mark.parametrize("body, says", [
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice: needs tools"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "no function 'nope'"),
    ({"messages": ASK, "tools": [WEATHER, WEATHER]}, "two functions of one name"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"messages": ASK, "tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "either tool calls or the JSON"),
    ({"messages": [*ASK, {"role": "tool", "content": "5"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "content: missing"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}, "tool_calls: only an assistant"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}}}],
      "tool_choice": "required"}, "tools: the schema cannot be enforced"),
    ({"prompt": "x", "tools": TOOLS}, "tools is not supported"),  # completions have no tools
])
def test_tool_mistakes_are_400s_naming_the_field(server, body, says):
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + endpoint, json={"model": "qwen", **body}, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
