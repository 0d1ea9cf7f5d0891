"""An OpenAI-compatible HTTP server over the serving engine (engine.py): many clients at once, continuously batched.

    python serve.py --checkpoint_path checkpoints/<repo>/model.pth [--compile] [--port 8000]

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with "stream": server-sent events),
GET /health, GET /metrics (Prometheus). FastAPI + uvicorn carry the HTTP on a thread of their own; the engine runs on
the main thread and hands each request's text to the event loop as it is produced. Binds 127.0.0.1 unless --host
says otherwise.
"""
from llama_fast.cli import (PRECISIONS, add_kv_cache_arg, add_model_args, check_at_least,  # first, before torch
                            check_device, cli_main)
import argparse
import asyncio
import json
import secrets
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llama_fast.checkpoint import check_vocab, load_model, tokenizer_file
from llama_fast.serving.api import (ChatRequest, CompletionRequest, chat_chunk, chat_response, completion_chunk,
                                    completion_response)
from llama_fast.serving.engine import MAX_LOOKUP, Engine, EngineConfig
from llama_fast.serving.request import Request
from llama_fast.serving.runner import WORKER_PING_S, ping_workers, stop_workers, worker_loop
from tokenizer import load_tokenizer
import tp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a Llama-family model over an OpenAI-compatible HTTP API.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", help="the model's name in the API (default: the checkpoint's folder)")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward passes (warmed up at start)")
    p.add_argument("--max_batch_size", type=int, default=16, help="requests decoded together")
    p.add_argument("--block_size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--kv_cache_tokens", type=int, default=0, help="KV-cache pool size in tokens (default: "
                   "max_batch_size full contexts, or half the free memory if smaller)")
    p.add_argument("--kv_cache_gb", type=float, default=0.0, help="KV-cache pool size in GiB instead")
    add_kv_cache_arg(p)
    p.add_argument("--max_num_batched_tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                   help="tokens one step computes, every request's together (decoding rows and prompt chunks)")
    p.add_argument("--prefill_chunk", type=int, default=EngineConfig.prefill_chunk,
                   help="the most prompt tokens of one request one step computes (0: the whole budget)")
    p.add_argument("--prompt_lookup", type=int, default=0, metavar="N", help="greedy requests speculate by prompt "
                   "lookup with N-grams unless they say otherwise (\"speculation\" field; 0: off)")
    p.add_argument("--speculate_k", type=int, default=EngineConfig.speculate_k, help="tokens prompt lookup proposes "
                   "per step")
    p.add_argument("--max_waiting", type=int, default=256, help="more waiting requests than this get a 503")
    p.add_argument("--no_prefix_caching", action="store_true", help="never reuse the KV blocks of a shared prefix")
    p.add_argument("--grace_period", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM or Ctrl-C")
    return p


class OpenAIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_name_of(checkpoint_path: Path) -> str:
    """checkpoints/meta-llama/Llama-3.2-1B/model.pth -> meta-llama/Llama-3.2-1B; otherwise the folder's name."""
    parts = checkpoint_path.resolve().parent.parts
    if "checkpoints" in parts[:-1]:
        return "/".join(parts[len(parts) - parts[::-1].index("checkpoints"):])
    return parts[-1]


class Server:
    """The engine's loop, and what the HTTP handlers (on uvicorn's thread) ask of it."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, max_waiting: int):
        self.engine, self.tokenizer, self.model_name, self.max_waiting = engine, tokenizer, model_name, max_waiting
        self.created = int(time.time())
        self.failed = None  # why the engine stopped, if it did: the process then exits non-zero
        self.stopping = threading.Event()
        self.registry = CollectorRegistry()
        self.registry.register(self)  # collect() below: the engine's gauges and counters
        self.ttft = Histogram("llama_fast_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.itl = Histogram("llama_fast_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56), registry=self.registry)

    def loop(self):
        """Step the engine until stopping is set. On the main thread: torch's OpenMP kernels started from another
        thread ran at half speed (2-core EPYC: 50 against 95 tokens/s)."""
        try:
            busy = time.monotonic()
            while not self.stopping.is_set():
                self.engine.wait_for_work(0.1)
                if self.engine.has_work():
                    self.engine.step()
                    busy = time.monotonic()
                elif time.monotonic() - busy > WORKER_PING_S:  # tensor parallel: the other ranks wait in a collective
                    ping_workers()
                    busy = time.monotonic()
        except Exception as e:  # the device or the model failing, or a bug: fail what is in flight, and exit
            traceback.print_exc()
            self.failed = f"the engine stopped: {type(e).__name__}: {e}"
            for r in [*self.engine.scheduler.running, *self.engine.scheduler.waiting, *self.engine.inbox]:
                if r.on_output and r.finish_reason is None:
                    r.finish_reason, r.error = "error", self.failed
                    r.on_output(r, "", [])

    def collect(self):
        e = self.engine
        s = e.scheduler
        values = {"requests_running": len(s.running), "requests_waiting": len(s.waiting) + len(e.inbox),
                  "kv_blocks_used": s.pool.n_used, "kv_blocks_free": s.pool.n_free}
        for name, value in values.items():
            yield GaugeMetricFamily(f"llama_fast_{name}", name.replace("_", " "), value=value)
        for name, value in e.stats.items():
            yield CounterMetricFamily(f"llama_fast_{name}", name.replace("_", " "), value=value)

    async def run(self, r: Request):
        """Submit r; yield (text, finish_reason) as the engine produces them, until a finish_reason."""
        if self.failed:
            raise OpenAIError(500, self.failed, "server_error")
        if self.stopping.is_set():
            raise OpenAIError(503, "the server is shutting down", "server_error")
        if len(self.engine.scheduler.waiting) + len(self.engine.inbox) >= self.max_waiting:
            raise OpenAIError(503, f"the server is busy ({self.max_waiting} requests waiting); retry later",
                              "server_error")
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        last = [None]

        def on_output(req, text, tokens):  # the engine's thread; finish_reason is read here, not when it arrives
            now = time.perf_counter()
            if tokens:
                if last[0] is None:
                    self.ttft.observe(now - req.arrival)
                else:
                    self.itl.observe(now - last[0])
                last[0] = now
            loop.call_soon_threadsafe(queue.put_nowait, (text, req.finish_reason))
        r.on_output = on_output
        try:
            self.engine.add(r)
        except ValueError as e:
            raise OpenAIError(400, str(e)) from None
        try:
            while True:
                text, finish_reason = await queue.get()
                if finish_reason == "error":  # this request failed (or the engine did); the others go on
                    raise OpenAIError(500, f"the request failed: {r.error}", "server_error")
                yield text, finish_reason
                if finish_reason:
                    return
        finally:
            if r.finish_reason is None:  # the client went away (or the server failed): free its blocks
                self.engine.abort(r.id)


def engine_request(server: Server, body, prompt: list[int], chat: bool) -> Request:
    """The engine's Request for an API request; eos: the tokenizer's, and with chat its end-of-turn token."""
    tok = server.tokenizer
    eos = [] if body.ignore_eos else list(tok.eos_ids) + ([tok.eot_id] if chat and tok.eot_id is not None else [])
    max_tokens = body.max_tokens_for(max(server.engine.context - len(prompt), 1))
    spec = body.speculation
    return Request(prompt, max_tokens, body.sampling(), tuple(body.stop_strings()), tuple(eos), body.seed,
                   speculation=(spec.prompt_lookup, spec.k) if spec else None)


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llama-fast", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def refused(request, e: OpenAIError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(OpenAIError(400, f"the body is not valid JSON ({first['ctx']['error']} at "
                                                 f"character {first['loc'][-1]})").body, status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        if not where and first["type"] in ("model_attributes_type", "dict_type", "missing"):
            first["msg"] = "the body must be a JSON object, sent as Content-Type: application/json"
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return JSONResponse(OpenAIError(400, message, param=where or None).body, status_code=400)

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = OpenAIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
                return JSONResponse(error.body, status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if server.failed:
            return JSONResponse({"status": "failed", "reason": server.failed}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "llama-fast"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(server, body.model)
        prompt = body.prompt_ids(server.tokenizer)
        return await respond(server, body, engine_request(server, body, prompt, chat=False), completion_response,
                             completion_chunk)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(server, body.model)
        prompt = body.prompt_ids(server.tokenizer)
        return await respond(server, body, engine_request(server, body, prompt, chat=True), chat_response, chat_chunk)

    return app


def check_model(server: Server, name: str):
    if name != server.model_name:
        raise OpenAIError(400, f"model {name!r} is not served here; this server has {server.model_name!r}",
                          param="model", code="model_not_found")


async def respond(server: Server, body, r: Request, response, chunk):
    """The whole answer as one JSON body, or (stream) its pieces as server-sent events ending with [DONE]."""
    meta = dict(id=f"{'chatcmpl' if chunk is chat_chunk else 'cmpl'}-{r.id}", created=int(time.time()),
                model=server.model_name)
    outputs = server.run(r)
    if not body.stream:
        async for _ in outputs:
            pass
        return response(r, **meta)
    first = await anext(outputs)  # errors (a prompt too long, a busy server) still become a status code

    async def events():
        i = 0
        try:
            async for text, finish_reason in prepend(first, outputs):
                for event in chunk(r, text, finish_reason, i == 0, **meta, include_usage=body.include_usage()):
                    yield f"data: {json.dumps(event)}\n\n"
                i += 1
        except OpenAIError as e:  # the status was sent with the first event: the error is an event (as vLLM's)
            yield f"data: {json.dumps(e.body)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


async def prepend(first, rest):
    yield first
    async for item in rest:
        yield item


def check_port(host: str, port: int):
    """Fail before the model loads, not after, when the address cannot be listened on."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def start(args):
    """(model, tokenizer, engine): the checkpoint loaded and the engine built, compiled and warmed up if asked."""
    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, args.device, PRECISIONS[args.precision], tp.world_size() > 1,
                       args.cpu_kernels, cpu_gemm=args.cpu_gemm)
    tokenizer = load_tokenizer(tokenizer_file(args.checkpoint_path, args.tokenizer_path))
    check_vocab(tokenizer, model)
    config = EngineConfig(max_batch_size=args.max_batch_size, block_size=args.block_size,
                          kv_cache_tokens=args.kv_cache_tokens, kv_cache_gb=args.kv_cache_gb,
                          max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk=args.prefill_chunk,
                          prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                          prompt_lookup=args.prompt_lookup,
                          speculate_k=args.speculate_k, compile=args.compile)
    engine = Engine(model, tokenizer, config)
    if args.compile:  # every kind of step compiled before the first client, not in the middle of live traffic
        t1 = time.perf_counter()
        engine.warm_up()
        print(f"Compiled the forward pass for every kind of step in {time.perf_counter() - t1:.1f}s",
              file=sys.stderr)
    print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - t0:.1f}s: KV cache of "
          f"{engine.runner.n_blocks - 1} blocks x {args.block_size} tokens ({args.kv_cache_dtype}, "
          f"{engine.runner.pool_bytes / 2**30:.2f} GiB)", file=sys.stderr)
    return model, tokenizer, engine


def run(args) -> int:
    check_at_least(args, port=0, max_batch_size=1, block_size=1, kv_cache_tokens=0, kv_cache_gb=0, prefill_chunk=0,
                   max_num_batched_tokens=args.max_batch_size, prompt_lookup=0, speculate_k=1, max_waiting=1,
                   grace_period=0)
    if args.prompt_lookup > MAX_LOOKUP or args.speculate_k > MAX_LOOKUP:
        raise ValueError(f"--prompt_lookup and --speculate_k must be at most {MAX_LOOKUP}")
    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, not {args.port}")
    check_device(args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        check_port(args.host, args.port)
    args.device = tp.maybe_init_dist(args.device)
    model, tokenizer, engine = start(args)
    if tp.rank() != 0:  # rank 0 tells this rank what to compute, and when to stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        worker_loop(engine.runner)
        return 0
    server = Server(engine, tokenizer, args.model_name or model_name_of(args.checkpoint_path), args.max_waiting)
    app = create_app(server, args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace_period)
    http = uvicorn.Server(config)

    def serve_http():
        try:
            http.run()
        finally:
            server.stopping.set()

    def stop(*_):  # as uvicorn would: stop accepting, let running requests finish; a second signal: at once
        http.force_exit, http.should_exit = http.should_exit, True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    http_thread = threading.Thread(target=serve_http, name="http", daemon=True)
    http_thread.start()
    try:  # from here on, however it ends, uvicorn is stopped and the other ranks are released
        while not (http.started or server.stopping.is_set()):
            time.sleep(0.01)
        if not http.started:
            raise ValueError(f"cannot listen on {args.host}:{args.port}")
        print(f"Serving {server.model_name} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        server.loop()  # until uvicorn has stopped, or the engine has
    finally:
        http.should_exit = True
        http_thread.join()
        stop_workers()
    if server.failed:  # a supervisor restarts a process that exits; one that answers 500 forever it cannot see
        print(f"error: {server.failed}; exiting", file=sys.stderr)
        return 1
    print("Stopped", file=sys.stderr)
    return 0


def main(argv=None):
    cli_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
