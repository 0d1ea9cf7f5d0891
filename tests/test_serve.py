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
from helpers import free_port, wait_until_healthy

from decoding import generate
from sampling import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"


class ServerProcess:
    def __init__(self, checkpoint_dir: Path, *flags, before: str = ""):
        """serve.py with flags; before: Python run before serve.main() in the server's process."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = ["-c", f"{before}\nimport serve\nserve.main()"] if before else ["serve.py"]
        self.proc = subprocess.Popen(
            [sys.executable, *command, "--checkpoint_path", str(checkpoint_dir / "model.pth"), "--device", "cpu",
             "--precision", "float32", "--port", str(self.port), "--block_size", "8", *map(str, flags)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until_healthy(self.proc, self.url)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("llama_fast")}

    def stop(self) -> str:
        """SIGTERM, and what the server wrote to stderr ("" if it had already stopped)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.communicate(timeout=60)[1]
        return ""


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
    prompt = sp_tokenizer.encode_chat(messages)
    expected = greedy(checkpoint[1], prompt, 16, sp_tokenizer.eos_ids)
    ends = expected[-1] in sp_tokenizer.eos_ids
    assert out.choices[0].message.content == sp_tokenizer.decode(expected[:-1] if ends else expected)
    assert out.choices[0].finish_reason == ("stop" if ends else "length")
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(expected)


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
    ({"model": "tiny", "prompt": "x", "n": 2}, "n is not supported"),
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
        prompt = sp_tokenizer.encode_chat(messages)
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
    s = ServerProcess(d, "--max_batch_size", "1", "--max_waiting", "1", "--model_name", "tiny")
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
            t.join(timeout=120)
        out, err = s.proc.communicate(timeout=60)
        assert s.proc.returncode == 0, err
        assert [r.status_code for r in results] == [200, 200]
        assert all(r.json()["usage"]["completion_tokens"] == 200 for r in results)
    finally:
        s.stop()


def test_an_int8_kv_cache_server_answers_what_the_int8_engine_computes(checkpoint, sp_tokenizer):
    """serve.py --kv_cache_dtype int8 reports the pool it allocated and answers greedy requests with what an
    Engine with an int8 pool computes in this process."""
    from llama_fast.serving.engine import Engine, EngineConfig
    s = ServerProcess(checkpoint[0], "--model_name", "tiny", "--kv_cache_dtype", "int8", "--kv_cache_tokens", "512")
    try:
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
