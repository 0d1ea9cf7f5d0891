"""serve.py end to end: a server subprocess on a free local port, driven by the real `openai` client (and plain HTTP
for what the client hides), answers compared with decoding.generate() of the same prompt in this process. CPU,
float32, greedy unless a test says otherwise."""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import KEY, ServerProcess

from decoding import generate
from llama_fast.chat.templates import Llama2Template
from llama_fast.serving import responses
from sampling import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint, load_cpu):
    _, d = hf_checkpoint("gqa")
    return d, load_cpu(d)


@pytest.fixture(scope="module")
def server(checkpoint):
    s = ServerProcess(checkpoint[0], "--api_key", KEY, "--model_name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(model, prompt: list, n: int, eos=()) -> list:
    return generate(model, [prompt], n, SamplingConfig(temperature=0), eos).tokens[0]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_equals_generate(client, checkpoint, sp_tokenizer):
    model = checkpoint[1]
    text = "The quick dog runs to the river"
    out = client.completions.create(model="tiny", prompt=text, max_tokens=20, temperature=0)
    expected = greedy(model, sp_tokenizer.encode(text), 20)
    assert out.choices[0].text == sp_tokenizer.decode(expected) and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(sp_tokenizer.encode(text)), 20)
    ids = sp_tokenizer.encode("A small bird sings")
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert out.choices[0].text == sp_tokenizer.decode(greedy(model, ids, 12))


def test_prompt_lookup_speculation_gives_the_greedy_text(client, server, checkpoint, sp_tokenizer):
    """The "speculation" extension field: a greedy request that repeats itself is verified draft by draft and
    answers exactly the greedy text; the metrics count proposed and accepted tokens."""
    ids = sp_tokenizer.encode("The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat")
    before = server.metrics()
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=40, temperature=0,
                                    extra_body={"speculation": {"prompt_lookup": 2, "k": 4}})
    assert out.choices[0].text == sp_tokenizer.decode(greedy(checkpoint[1], ids, 40))
    assert server.metrics()["llama_fast_draft_tokens_total"] > before["llama_fast_draft_tokens_total"]


def test_chat_completion_uses_the_chat_template(client, checkpoint, sp_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the cat sleep?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    prompt = Llama2Template(sp_tokenizer).encode(messages)
    expected = greedy(checkpoint[1], prompt, 16, sp_tokenizer.eos_ids)
    ends = expected[-1] in sp_tokenizer.eos_ids
    assert out.choices[0].message.content == sp_tokenizer.decode(expected[:-1] if ends else expected)
    assert out.choices[0].finish_reason == ("stop" if ends else "length")
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(expected)


def hf_log_softmax(hf_model, tokens: list):
    import torch
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), -1)


def test_logprobs_and_echo_equal_transformers(client, checkpoint, hf_checkpoint, sp_tokenizer):
    """Completions: logprobs with echo (the prompt's tokens first, the first null) and max_tokens 0 (scoring only);
    chat: logprobs and top_logprobs. Each equals transformers' float32 log-softmax (2e-3); the tokens are the
    tokenizer's, their text offsets add up."""
    hf = hf_checkpoint("gqa")[0]
    ids = sp_tokenizer.encode("The little boat sails on the lake")
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, logprobs=3, echo=True)
    choice = out.choices[0]
    tokens = ids + greedy(checkpoint[1], ids, 5)
    reference = hf_log_softmax(hf, tokens)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(tokens)
    for i, (got, top) in enumerate(zip(lp.token_logprobs[1:], lp.top_logprobs[1:])):
        assert abs(got - reference[i, tokens[i + 1]].item()) < 2e-3
        best = reference[i].topk(3)
        expected = {responses.token_string(sp_tokenizer, t): v
                    for t, v in zip(best.indices.tolist(), best.values.tolist())}
        assert top.keys() == expected.keys() and list(top.values()) == pytest.approx(list(expected.values()), abs=2e-3)
    assert lp.tokens == [responses.token_string(sp_tokenizer, t) for t in tokens]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(tokens))]
    assert choice.text == sp_tokenizer.decode(ids) + sp_tokenizer.decode(tokens[len(ids):])
    scored = client.completions.create(model="tiny", prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(ids)], abs=1e-5)
    assert scored.usage.completion_tokens == 0 and scored.choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "Where is the boat?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    prompt = Llama2Template(sp_tokenizer).encode(messages)
    tokens = prompt + greedy(checkpoint[1], prompt, 6)
    reference = hf_log_softmax(hf, tokens)
    for i, entry in enumerate(chat.choices[0].logprobs.content):
        at = len(prompt) - 1 + i
        assert abs(entry.logprob - reference[at, tokens[at + 1]].item()) < 2e-3
        assert bytes(entry.bytes) == sp_tokenizer.token_bytes(tokens[at + 1]) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(reference[at].max().item(), abs=2e-3)
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, stream=True, extra_body={"ignore_eos": True})
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in chat.choices[0].logprobs.content])


def test_n_choices_logit_bias_nulls_and_cached_tokens(client, server, sp_tokenizer):
    """n choices: choice i draws what seed + i gives alone, the prompt prefilled once; several prompts in one
    request; logit_bias; null for a default; usage counts each prompt once and its cached tokens."""
    prompt = " ".join(["The green frog jumps into the pond and swims away."] * 4)
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, seed=11)
    before = server.metrics()
    out = client.completions.create(n=3, **kwargs)
    n_prompt = len(sp_tokenizer.encode(prompt))
    hit = "llama_fast_prefix_cache_hit_tokens_total"
    hits = server.metrics()[hit] - before[hit]
    assert hits >= 2 * (n_prompt - 8)  # choices 1 and 2 reuse choice 0's full blocks
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == 30
    for i, choice in enumerate(out.choices):
        assert choice.index == i
        assert choice.text == client.completions.create(**{**kwargs, "seed": 11 + i}).choices[0].text
    again = client.completions.create(**kwargs)
    assert again.usage.prompt_tokens_details.cached_tokens >= n_prompt - 8
    texts = ["A cat", "Two dogs"]
    both = client.completions.create(model="tiny", prompt=texts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3] and both.choices[0].text == both.choices[1].text
    assert both.choices[2].text == client.completions.create(model="tiny", prompt="Two dogs", max_tokens=6,
                                                             temperature=0).choices[0].text
    streamed = client.completions.create(n=2, stream=True, **kwargs)
    joined = ["", ""]
    for c in streamed:
        joined[c.choices[0].index] += c.choices[0].text
    assert joined == [c.text for c in out.choices[:2]]
    token = sp_tokenizer.encode("zebra", bos=False)[0]
    forced = client.completions.create(model="tiny", prompt="A cat", max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100})
    assert forced.choices[0].text == sp_tokenizer.decode([token] * 3)
    nulls = {"model": "tiny", "prompt": "A cat", "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
             "stream": None, "stop": None, "seed": None, "logprobs": None, "presence_penalty": None, "user": None}
    r = httpx.post(server.url + "/v1/completions", json=nulls, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_structured_output_through_the_openai_client(client, sp_tokenizer):
    """response_format json_schema (chat, greedy and sampled, streamed) and json_object (completions): the text
    parses and validates, or the request ends with "length"; an unconstrained request beside them is what it is
    alone."""
    import jsonschema
    from concurrent.futures import ThreadPoolExecutor

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "people": {
        "type": "integer", "minimum": 0, "maximum": 1000}, "tags": {"type": "array", "items": {"type": "string",
                                                                                             "maxLength": 8},
                                                                     "maxItems": 3}},
              "required": ["city", "people"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Describe a city as JSON."}]
    alone = client.completions.create(model="tiny", prompt="The river", max_tokens=20, temperature=0).choices[0].text
    jobs = [dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=0.8, seed=2, n=2)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.chat.completions.create, model="tiny", messages=messages, max_tokens=120,
                               response_format=fmt, **job) for job in jobs]
        beside = pool.submit(client.completions.create, model="tiny", prompt="The river", max_tokens=20,
                             temperature=0)
        outs = [f.result() for f in futures]
    assert beside.result().choices[0].text == alone
    choices = [c for out in outs for c in out.choices]
    for c in choices:
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), schema)
    assert sum(c.finish_reason == "stop" for c in choices) >= 3
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=120, response_format=fmt,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choices[0].message.content
    out = client.completions.create(model="tiny", prompt="A JSON object:", max_tokens=100, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})  # vLLM's extension
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].text), dict)


def test_tokenize_detokenize_model_and_error_shapes(server, sp_tokenizer):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/tokenize", json={"prompt": "The small cat"}, headers=auth).json()
    assert r["tokens"] == sp_tokenizer.encode("The small cat") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    r = httpx.post(server.url + "/tokenize", json={"prompt": "The small cat", "add_special_tokens": False},
                   headers=auth).json()
    assert r["tokens"] == sp_tokenizer.encode("The small cat", bos=False)
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": messages}, headers=auth).json()
    assert r["tokens"] == Llama2Template(sp_tokenizer).encode(messages)
    r = httpx.post(server.url + "/detokenize", json={"tokens": sp_tokenizer.encode("The small cat")}, headers=auth)
    assert r.json() == {"prompt": "The small cat"}
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/v1/models/tiny", headers=auth).json()["id"] == "tiny"
    for method, path, status in [("GET", "/v1/models/gpt-4", 404), ("GET", "/v1/nothing", 404),
                                 ("GET", "/v1/completions", 405), ("POST", "/detokenize", 400),
                                 ("POST", "/tokenize", 400)]:
        r = httpx.request(method, server.url + path, headers=auth, json={"tokens": [10**9]} if method == "POST"
                          else None)
        assert r.status_code == status and r.json()["error"]["message"], (path, r.text)


def test_streamed_deltas_join_to_the_whole_answer(client):
    whole = client.completions.create(model="tiny", prompt="One old king", max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="One old king", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices
    messages = [{"role": "user", "content": "Tell me about the blue boat."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_stop_strings(client):
    whole = client.completions.create(model="tiny", prompt="The teacher reads", max_tokens=30, temperature=0)
    text = whole.choices[0].text
    stop = text[12:15]
    out = client.completions.create(model="tiny", prompt="The teacher reads", max_tokens=30, temperature=0,
                                    stop=[stop, "zzzz"])
    assert out.choices[0].text == text[:text.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="The teacher reads", max_tokens=30, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]


def test_seeded_sampling_repeats(client):
    kwargs = dict(model="tiny", prompt="A happy fish", max_tokens=20, temperature=1.0, top_p=0.9, seed=5,
                  extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2})
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    assert client.completions.create(**{**kwargs, "seed": 6}).choices[0].text != first


@pytest.mark.parametrize("body, message", [
    ('{"model": "tiny", "prompt": "x"', "not valid JSON"),
    ('["model"]', "must be a JSON object"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "tiny", "prompt": 5}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "gpt-4", "prompt": "x"}, "not served here"),
    ({"model": "tiny", "prompt": [1] * 300}, "maximum context length is 256"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 400}, "maximum context length"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny", "prompt": ["x"] * 40, "n": 2}, "at most 64"),
    ({"model": "tiny", "prompt": "x", "tempreature": 0.5}, "tempreature: unknown field"),
    ({"model": "tiny", "prompt": "x", "tools": [{"type": "function"}]}, "tools is not supported"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix is not supported"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema"}}, "json_schema goes with"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "u", "schema": {"type": "array", "uniqueItems": True}}}}, "cannot be enforced"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "logprobs": True}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "seed": 2**64 - 1, "n": 2}, "seed must be in"),  # choice 1's seed + 1
    ({"model": None, "prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "\ud800"}, "prompt"),  # a lone surrogate
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "must alternate"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "a"}]}, "tool_call_id"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {
        "name": "f"}}]}, "does not show the model tools"),  # Llama-2's template has no tools
    ({"model": "tiny", "messages": [{"role": "user", "content": "a", "tool_call_id": "1"}]}, "tool_call_id"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "needs logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "seed": 2**64}, "seed must be in"),  # once killed the engine's thread
    ({"model": "tiny", "prompt": "x", "seed": -2**63 - 1}, "seed must be in"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "prompt": "x", "speculation": {"prompt_lookup": 17}}, "speculation.prompt_lookup"),
    ({"model": "tiny", "prompt": "x", "speculation": {"prompt_lookup": 2, "k": 0}}, "speculation.k"),
    ({"model": "tiny", "prompt": "x", "speculation": {"prompt_lookup": 2, "draft": 3}}, "speculation.draft"),
])
def test_bad_requests_get_400_with_an_openai_error_body(server, body, message):
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + endpoint, content=content, headers={"Authorization": f"Bearer {KEY}",
                                                                  "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").status_code == 200  # and the server goes on serving


def test_api_key(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # not behind the key
    assert client.models.list().data  # and the server goes on serving


def test_a_disconnected_stream_frees_its_blocks(server):
    body = {"model": "tiny", "prompt": "The old doctor walks", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metrics()["llama_fast_kv_blocks_used"] > 0
    deadline = time.time() + 30
    while (m := server.metrics())["llama_fast_kv_blocks_used"] or m["llama_fast_requests_running"]:
        assert time.time() < deadline, m
        time.sleep(0.1)


def test_a_shared_system_prompt_is_prefilled_once(client, server, checkpoint, sp_tokenizer):
    system = " ".join(["The small red bird sings when the sun is up over the green hills."] * 3)
    answers = []
    for question in ("Who sings?", "What is green?"):
        before = server.metrics()
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        after = server.metrics()
        prompt = Llama2Template(sp_tokenizer).encode(messages)
        expected = greedy(checkpoint[1], prompt, 8, sp_tokenizer.eos_ids)
        answers.append((out.choices[0].message.content, sp_tokenizer.decode([t for t in expected
                                                                               if t not in sp_tokenizer.eos_ids])))
        hits = after["llama_fast_prefix_cache_hit_tokens_total"] - before["llama_fast_prefix_cache_hit_tokens_total"]
        prefilled = after["llama_fast_prefill_tokens_total"] - before["llama_fast_prefill_tokens_total"]
        assert prefilled + hits == len(prompt)
    assert hits >= len(sp_tokenizer.encode(system)) - 8 and prefilled < len(prompt) / 2
    assert all(got == want for got, want in answers)


def test_busy_server_503_and_sigterm_finishes_running_requests(hf_checkpoint):
    """One running request and one waiting fill --max_waiting 1 and --max_batch_size 1: a third gets a 503.
    SIGTERM then lets both finish and the server exits 0. (A model large enough that a request takes seconds.)"""
    _, d = hf_checkpoint("slow", hidden_size=512, num_hidden_layers=8, intermediate_size=1376)
    # a grace period well past the two requests' time, even on a machine busy with other tests
    s = ServerProcess(d, "--max_batch_size", "1", "--max_waiting", "1", "--model_name", "tiny", "--grace_period", "120")
    results = []

    def ask():
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "The car", "max_tokens": 200,
                                                         "temperature": 0, "ignore_eos": True}, timeout=120)
        results.append(r)
    try:
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.5)
        busy = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=150)
        out, err = s.proc.communicate(timeout=60)
        assert s.proc.returncode == 0, err
        assert [r.status_code for r in results] == [200, 200]
        assert all(r.json()["usage"]["completion_tokens"] == 200 for r in results)
    finally:
        s.stop()


# every step 20 ms longer: a request of 240 tokens takes 5 s at least
SLOW_STEPS = """
import time
from llama_fast.serving.runner import ModelRunner
forward = ModelRunner.forward
ModelRunner.forward = lambda self, rows: (time.sleep(0.02), forward(self, rows))[1]
"""


def test_a_client_that_leaves_is_cancelled_and_sigterm_ends_long_streams_cleanly(checkpoint):
    """A non-streaming request whose client leaves stops generating and frees its blocks. SIGTERM with a stream
    that outlasts --grace_period: the stream ends with an error event and [DONE], and the server exits 0."""
    s = ServerProcess(checkpoint[0], "--model_name", "tiny", "--grace_period", "2", before=SLOW_STEPS)
    body = {"model": "tiny", "prompt": "The car", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
        deadline = time.time() + 30
        while (m := s.metrics())["llama_fast_requests_running"] or m["llama_fast_kv_blocks_used"]:
            assert time.time() < deadline, m
            time.sleep(0.1)
        assert m["llama_fast_generation_tokens_total"] < 240  # it stopped well before its end
        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and not lines:
                    s.proc.send_signal(signal.SIGTERM)
                lines += [line] if line.startswith("data:") else []
        assert lines[-1] == "data: [DONE]" and "shut down" in json.loads(lines[-2][5:])["error"]["message"]
        out, err = s.proc.communicate(timeout=60)
        assert s.proc.returncode == 0, err
    finally:
        s.stop()


def test_an_int8_kv_cache_server_answers_what_the_int8_engine_computes(checkpoint, sp_tokenizer, tmp_path):
    """serve.py --kv_cache_dtype int8 reports the pool it allocated and answers greedy requests with what an
    Engine with an int8 pool computes in this process. Its checkpoint has no tokenizer_config.json: chat is refused
    (a 400 that says how to give a template), completions are served."""
    from llama_fast.serving.engine import Engine, EngineConfig
    for name in ("model.pth", "model_config.json", "tokenizer.model"):
        (tmp_path / name).symlink_to(checkpoint[0] / name)
    s = ServerProcess(tmp_path, "--model_name", "tiny", "--kv_cache_dtype", "int8", "--kv_cache_tokens", "512")
    try:
        chat = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=60)
        assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
        assert "--chat_template" in chat.json()["error"]["message"]
        ids = sp_tokenizer.encode("The old king walks to the city")
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 24,
                                                        "temperature": 0, "ignore_eos": True}, timeout=60)
        engine = Engine(copy.deepcopy(checkpoint[1]), None, EngineConfig(block_size=8, kv_cache_dtype="int8"))
        assert r.json()["choices"][0]["text"] == sp_tokenizer.decode(engine.generate([ids], 24)[0].output)
        assert "KV cache of 64 blocks x 8 tokens (int8, " in s.stop()
    finally:
        s.stop()


# Faults only some prompts meet (token ids starting 3, 1, 4: at once; 3, 1, 5: after 3 tokens), and one that breaks
# the model for good (2, 7, 1)
FAULTS = """
from llama_fast.serving.runner import ModelRunner
forward = ModelRunner.forward
def faulty(self, rows):
    if any(r.prompt[:3] == [2, 7, 1] for r, _ in rows):
        ModelRunner.forward = dead
    if any(r.prompt[:3] == [3, 1, 4] or r.prompt[:3] == [3, 1, 5] and len(r.output) >= 3 for r, _ in rows):
        raise RuntimeError("a fault only this prompt meets")
    return forward(self, rows)
def dead(self, rows):
    raise RuntimeError("device lost")
ModelRunner.forward = faulty
"""


def test_a_failing_request_fails_alone_and_a_failing_engine_exits(checkpoint, sp_tokenizer):
    """A request whose forward pass fails gets a 500 with OpenAI's error body (streamed, once tokens were sent: an
    error event, then [DONE]) while a request decoding beside it finishes with the greedy text and the server
    stays healthy. When the model fails whatever it computes, the request gets a 500 and the process exits 1
    saying why: a supervisor restarts it (it never answers 500 forever)."""
    s = ServerProcess(checkpoint[0], "--model_name", "tiny", before=FAULTS)
    try:
        body = {"model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        healthy = [None]
        thread = threading.Thread(target=lambda: healthy.__setitem__(0, httpx.post(
            s.url + "/v1/completions", json={**body, "prompt": [5, 6, 7, 8]}, timeout=60)))
        thread.start()
        poisoned = httpx.post(s.url + "/v1/completions", json={**body, "prompt": [3, 1, 4, 1, 5]}, timeout=60)
        assert poisoned.status_code == 500
        assert poisoned.json()["error"] == {"message": "the request failed: RuntimeError: a fault only this prompt "
                                            "meets", "type": "server_error", "param": None, "code": None}
        stream = {**body, "stream": True}
        assert httpx.post(s.url + "/v1/completions", json={**stream, "prompt": [3, 1, 4]}).status_code == 500
        with httpx.stream("POST", s.url + "/v1/completions", json={**stream, "prompt": [3, 1, 5]}, timeout=60) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and events[-1] == "data: [DONE]" and len(events) == 3 + 2
        assert "a fault only this prompt meets" in json.loads(events[-2][6:])["error"]["message"]
        thread.join(timeout=60)
        assert healthy[0].status_code == 200
        text = sp_tokenizer.decode(greedy(checkpoint[1], [5, 6, 7, 8], 40))
        assert healthy[0].json()["choices"][0]["text"] == text and httpx.get(s.url + "/health").status_code == 200
        dead = httpx.post(s.url + "/v1/completions", json={**body, "prompt": [2, 7, 1]}, timeout=60)
        assert dead.status_code == 500 and "device lost" in dead.json()["error"]["message"]
        _, err = s.proc.communicate(timeout=60)
        assert s.proc.returncode == 1
        assert err.strip().splitlines()[-1] == ("error: the engine stopped: EngineFailure: the model fails whatever "
                                                "it computes: RuntimeError: device lost; exiting")
    finally:
        s.stop()


def test_port_0_announces_the_real_port_and_a_short_context_fits_a_small_pool(checkpoint):
    """--port 0 prints the port the system chose; --max_model_len lets a pool smaller than the model's context
    serve, and /v1/models says the context served."""
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint_path", str(checkpoint[0] / "model.pth"),
                             "--device", "cpu", "--precision", "float32", "--port", "0", "--block_size", "8",
                             "--kv_cache_tokens", "64", "--max_model_len", "64", "--model_name", "tiny"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = next(line for line in proc.stderr if line.startswith("Serving"))
        url = line.split(" at ")[1].strip().removesuffix("/v1")
        assert not url.endswith(":0")
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 64
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1] * 60, "max_tokens": 8})
        assert r.status_code == 400 and "maximum context length is 64" in r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_refuses_a_port_in_use_before_loading(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "serve.py", "--checkpoint_path", str(checkpoint[0] / "model.pth"),
                               "--device", "cpu", "--port", str(port)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ})
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Loaded" not in proc.stderr


def test_bench_serve_measures_a_workload(server, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench_serve.py", "--url", server.url + "/v1", "--api_key", KEY,
                           "--num_requests", "6", "--prompt_tokens", "5", "20", "--output_tokens", "4", "12",
                           "--concurrency", "3", "--vocab", "3", "399", "--speculation", "2", "3", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["num_requests"] == 6 and len(result["requests"]) == 6
    assert all(4 <= r["output_tokens"] <= 12 and r["ttft"] > 0 for r in result["requests"])
    assert result["total_output_tokens"] == sum(r["output_tokens"] for r in result["requests"])
    assert result["output_tokens_per_s"] > 0 and result["ttft_s"]["p50"] <= result["ttft_s"]["p99"]
    assert "output tokens/s" in proc.stdout


def test_bench_serve_splits_events_only_where_sse_ends_a_line():
    """A streamed event whose JSON holds U+2028, U+0085 or a form feed raw (llama-server writes them so; httpx's
    aiter_lines cut such events in two: "Unterminated string") is read whole, however the stream is cut into
    chunks, with \\n, \\r\\n (cut between its two characters too) and \\r line ends."""
    import asyncio
    from scripts.bench_serve import sse_lines
    events = [{"choices": [{"text": t}]} for t in ("a\u2028b", "\x85", "c\x0cd\u2029", "plain")]
    stream = "".join(f"data: {json.dumps(e, ensure_ascii=False)}{end}{end}"
                     for e, end in zip(events, ("\n", "\r\n", "\r", "\r\n"))) + "data: [DONE]"

    async def read(size):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]

        async def aiter():
            for c in chunks:
                yield c
        return [line async for line in sse_lines(aiter())]
    for size in (1, 2, 3, 7, len(stream)):
        lines = asyncio.run(read(size))
        assert [json.loads(line[5:]) for line in lines if line.startswith("data: {")] == events
        assert lines[-1] == "data: [DONE]" and lines.count("") == 4


def test_bench_serve_takes_prompts_from_a_file(server, tmp_path, sp_tokenizer):
    """--prompt_file: the texts of a JSON-lines file, in turn; each request's prompt length is what the server's
    usage says, checked against the tokenizer."""
    texts = ["the quick dog sees a red bird", "a small cat and the old king of the city"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench_serve.py", "--url", server.url + "/v1", "--api_key", KEY,
                           "--num_requests", "4", "--output_tokens", "3", "6", "--prompt_file", str(prompts),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lengths = [len(sp_tokenizer.encode(t)) for t in texts]
    assert [r["prompt_tokens"] for r in json.loads(out.read_text())["requests"]] == lengths * 2
    prompts.write_text('{"text": "no prompt field"}\n')
    proc = subprocess.run([sys.executable, "scripts/bench_serve.py", "--url", server.url + "/v1", "--prompt_file",
                           str(prompts)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and 'prompts.jsonl:1: not a JSON object with a "prompt" string' in proc.stderr
