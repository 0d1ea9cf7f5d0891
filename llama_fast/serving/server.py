"""The serving engine behind HTTP: the engine's loop on the main thread, and what the HTTP handlers (routes.py, on
uvicorn's thread) ask of it: submit requests and read their text as it is produced, the metrics, the shutdown."""
import asyncio
import contextlib
import threading
import time
import traceback

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llama_fast.chat.tool_calls import tool_call_format
from llama_fast.serving.engine import Engine
from llama_fast.serving.request import Request
from llama_fast.serving.runner import WORKER_PING_S, ping_workers


class OpenAIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Server:
    """The engine's loop, and what the HTTP handlers (on uvicorn's thread) ask of it."""

    def __init__(self, engine: Engine, tokenizer, template, model_name: str, max_waiting: int):
        self.engine, self.tokenizer, self.template = engine, tokenizer, template  # template: None when it has none
        self.tool_format = tool_call_format(template)  # how the model writes tool calls; None: tools are refused
        self.model_name, self.max_waiting = model_name, max_waiting
        self.created = int(time.time())
        self.failed = None  # why the engine stopped, if it did: the process then exits non-zero
        self.shutting_down = False  # the shutdown's grace period is over: what still runs is aborted
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

    async def run(self, requests: list[Request]):
        """Submit the requests (a response's choices); yield (choice, text, token ids, finish_reason) as the engine
        produces them, until each has a finish_reason. A choice that fails fails the response."""
        if self.failed:
            raise OpenAIError(500, self.failed, "server_error")
        if self.stopping.is_set() or self.shutting_down:
            raise OpenAIError(503, "the server is shutting down", "server_error")
        if len(self.engine.scheduler.waiting) + len(self.engine.inbox) + len(requests) > self.max_waiting:
            raise OpenAIError(503, f"the server is busy ({self.max_waiting} requests waiting); retry later",
                              "server_error")
        for r in requests:
            try:
                self.engine.check(r)
            except ValueError as e:
                raise OpenAIError(400, str(e)) from None
        queue = asyncio.Queue()
        for i, r in enumerate(requests):
            r.on_output = self.on_output(i, queue, asyncio.get_running_loop())
        try:
            for r in requests:
                self.engine.add(r)
            left = len(requests)
            while left:
                i, text, tokens, finish_reason = await queue.get()
                if finish_reason == "error":  # this request failed (or the engine did); the others go on
                    raise OpenAIError(500, f"the request failed: {requests[i].error}", "server_error")
                if finish_reason == "abort":  # only the shutdown aborts a request whose client is still there
                    raise OpenAIError(503, "the server shut down before the request finished", "server_error")
                yield i, text, tokens, finish_reason
                left -= bool(finish_reason)
        finally:
            for r in requests:
                if r.finish_reason is None:  # the client went away (or the server failed): free its blocks
                    self.engine.abort(r.id)

    def on_output(self, i: int, queue: asyncio.Queue, loop):
        """Request.on_output for choice i: called on the engine's thread (finish_reason is read there, not when it
        arrives), it times the tokens and hands them to the event loop."""
        last = None

        def on_output(r, text, tokens):
            nonlocal last
            now = time.perf_counter()
            if tokens:
                (self.ttft if last is None else self.itl).observe(now - (r.arrival if last is None else last))
                last = now
            with contextlib.suppress(RuntimeError):  # the event loop has closed (shut down): nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, (i, text, tokens, r.finish_reason))
        return on_output

    def abort_all(self):
        """The shutdown's grace period is over: every request still running ends with an error to its client."""
        self.shutting_down = True
        with self.engine.lock:
            requests = [*self.engine.scheduler.running, *self.engine.scheduler.waiting, *self.engine.inbox]
        for r in requests:
            self.engine.abort(r.id)
