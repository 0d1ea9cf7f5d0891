"""serve.py under fuzzed traffic: 320 generated requests, 8 at a time, against one server subprocess (random and
malformed fields, types, nulls, huge and negative numbers, bad roles, tools and tool calls, broken JSON, Unicode edge
cases, clients that leave mid-stream and mid-wait). Every answer must be a success or a 4xx in OpenAI's error shape,
never a 5xx; then the server must answer a plain request with the text it gave before the fuzzing, and hold no
request and no KV block."""
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from helpers import KEY, ServerProcess

N_REQUESTS = 320
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "logit_bias",
          "frequency_penalty", "presence_penalty", "repetition_penalty", "ignore_eos", "user", "speculation",
          "response_format", "tools", "tool_choice", "suffix", "best_of", "store", "metadata", "bogus_field"]
TEXTS = ["", " ", "The cat", "\ud800", "\u0000", "🎉" * 50, "مرحبا بالعالم", "x" * 5000, "<s></s>[INST]", "\n\t\r",
         "<|im_start|>", "é" * 300, "\U0010ffff"]
PLAIN = {"model": "tiny", "prompt": "The old sailor", "max_tokens": 12, "temperature": 0}


def random_value(rng: random.Random, depth: int = 0):
    kinds = [lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-5, 40),
             lambda: rng.choice([0, -1, 2**63, 2**64, -2**63 - 1, 10**30, 256, 257]),
             lambda: rng.choice([0.0, -0.5, 1.5, 1e308, 3.7, 2.0, 1e-9]), lambda: rng.choice(TEXTS),
             lambda: [rng.randint(-3, 1100) for _ in range(rng.randint(0, 6))]]
    if depth < 2:
        kinds += [lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                  lambda: {rng.choice(["type", "include_usage", "prompt_lookup", "k", "5", "role", "content"]):
                           random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}]
    return rng.choice(kinds)()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "string", "maxLength": 3}}, "required": ["x"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": "a"}'}}


def random_messages(rng: random.Random) -> list:
    roles = ["system", "user", "assistant", "developer", "tool", "function", "bot", ""]
    return [{"role": rng.choice(roles), "content": rng.choice([rng.choice(TEXTS), [{"type": "text", "text": "hi"}],
                                                                [{"type": "image_url"}], None, 5])}
            | ({"name": "bob"} if rng.random() < 0.1 else {})
            | rng.choice([{}] * 8 + [{"tool_calls": [CALL]}, {"tool_call_id": "call_1"}, {"tool_calls": 5}])
            for _ in range(rng.randint(0, 4))]


def random_request(rng: random.Random) -> tuple[str, dict | str, str]:
    """(endpoint, body (a string: sent as it is), how the client behaves: "wait", "leave" or "leave_stream")."""
    chat = rng.random() < 0.5
    body = {"model": "tiny", "max_tokens": rng.randint(1, 8), "temperature": rng.choice([0, 0.7, 1.0])}
    if chat:
        body["messages"] = random_messages(rng) if rng.random() < 0.5 else [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = rng.choice([rng.choice(TEXTS), [rng.randint(0, 999) for _ in range(rng.randint(1, 20))],
                                     ["a", "b"], [[1, 2], [3]], "The dog", "A red car"])
    for name in rng.sample(FIELDS, rng.choices([0, 1, 2, 4], [0.4, 0.3, 0.2, 0.1])[0]):
        body[name] = random_value(rng)
    if rng.random() < 0.2:  # well-formed extras that should work
        body |= rng.choice([{"n": 2, "seed": 3}, {"logprobs": 2, "echo": True} if not chat else {"logprobs": True},
                            {"stream": True, "stream_options": {"include_usage": True}}, {"stop": ["the", "a"]},
                            {"logit_bias": {"5": -100}},
                            {"tools": [TOOL], "tool_choice": rng.choice(["auto", "required", "none", {
                                "type": "function", "function": {"name": "f"}}]), "stream": rng.random() < 0.5}])
    endpoint = "/v1/chat/completions" if chat else rng.choice(["/v1/completions"] * 8 + ["/v1/bogus", "/tokenize"])
    raw = json.dumps(body, allow_nan=True)
    if rng.random() < 0.08:
        raw = rng.choice([raw[:rng.randint(0, len(raw))], raw.replace(":", "", 1), "[1, 2]", "null", '"text"',
                          raw + "}", json.dumps(body).replace("0.7", "NaN")])
    behaviour = rng.choices(["wait", "leave", "leave_stream"], [0.85, 0.08, 0.07])[0]
    return endpoint, raw, behaviour


def send(url: str, endpoint: str, raw: str, behaviour: str):
    """The status and the body (None for a client that left)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if behaviour == "leave":  # gone before the answer
        try:
            httpx.post(url + endpoint, content=raw, headers=headers, timeout=httpx.Timeout(10, read=0.05))
        except httpx.ReadTimeout:
            return None
        return None
    if behaviour == "leave_stream":
        raw = json.dumps({**json.loads(raw), "stream": True}) if raw.startswith("{") and is_json(raw) else raw
        with httpx.stream("POST", url + endpoint, content=raw, headers=headers, timeout=60) as r:
            for _ in r.iter_lines():
                break  # one line, then gone
        return None
    r = httpx.post(url + endpoint, content=raw, headers=headers, timeout=120)
    return r.status_code, r.headers.get("content-type", ""), r.text


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def check_answer(status: int, content_type: str, text: str, request: tuple):
    assert status < 500, (status, text, request)
    if status >= 400:
        error = json.loads(text)["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"], (text, request)
    elif content_type.startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", (text, request)
        for event in events[:-1]:
            assert "error" not in json.loads(event), (text, request)
    else:
        assert json.loads(text)["choices"] or "tokens" in json.loads(text), (text, request)


def test_no_request_can_take_the_server_down(qwen_tools_checkpoint):
    """On the Qwen test model, whose template shows tools (so tool calls are exercised too)."""
    s = ServerProcess(qwen_tools_checkpoint, "--api_key", KEY, "--model_name", "tiny", "--max_batch_size", "8",
                      "--max_waiting", "1000")
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        fresh = httpx.post(s.url + "/v1/completions", json=PLAIN, headers=auth).json()["choices"][0]["text"]
        rng = random.Random(2026)
        requests = [random_request(rng) for _ in range(N_REQUESTS)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda req: send(s.url, *req), requests))
        for request, answer in zip(requests, answers):
            if answer is not None:
                check_answer(*answer, request)
        statuses = [a[0] for a in answers if a]
        assert statuses.count(200) >= 40 and sum(400 <= x < 500 for x in statuses) >= 100  # both kinds exercised
        assert httpx.post(s.url + "/v1/completions", json=PLAIN, headers=auth).json()["choices"][0]["text"] == fresh
        deadline = time.time() + 30
        while (m := s.metrics())["llama_fast_requests_running"] or m["llama_fast_kv_blocks_used"] \
                or m["llama_fast_requests_waiting"]:
            assert time.time() < deadline, m
            time.sleep(0.1)
        assert s.proc.poll() is None
    finally:
        assert "Traceback" not in s.stop()
