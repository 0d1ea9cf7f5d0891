"""The HTTP routes (FastAPI) over a Server (server.py): OpenAI's completions and chat completions, streamed or not,
the models, tokenize and detokenize, health and metrics; every error in OpenAI's shape."""
import asyncio
import contextlib
import json
import secrets
import time

import jinja2
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_fast.chat.templates import NO_TEMPLATE, stop_ids
from llama_fast.serving.api import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from llama_fast.serving.grammar import GrammarError
from llama_fast.serving.request import Request
from llama_fast.serving.responses import (ToolCallStream, chat_chunk, chat_response, completion_chunk,
                                          completion_response, scored_output, usage_chunk)
from llama_fast.serving.server import OpenAIError, Server

GUARDED = ("/v1", "/tokenize", "/detokenize")  # the routes --api_key protects (not /health and /metrics)
CLIENT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def engine_requests(server: Server, body, prompts: list[list[int]], chat: bool) -> list[Request]:
    """The engine's Requests for an API request: n for each prompt, choice j seeded with seed + j, the others
    reusing the first's prompt from the prefix cache; eos: the tokenizer's, and with chat the template's
    end-of-turn token."""
    eos = [] if body.ignore_eos else stop_ids(server.template) if chat else list(server.tokenizer.eos_ids)
    spec = body.speculation
    requests = []
    for prompt in prompts:
        first = None
        for j in range(body.n):
            r = Request(prompt, body.max_tokens_for(max(server.engine.context - len(prompt), 1)), body.sampling(),
                        tuple(body.stop_strings()), tuple(eos), None if body.seed is None else body.seed + j,
                        speculation=(spec.prompt_lookup, spec.k) if spec else None, logprobs=body.token_logprobs(),
                        prompt_logprobs=body.prompt_logprobs(), logit_bias=body.bias(), shares_prompt_with=first)
            first = first or r
            requests.append(r)
    return requests


async def tokenize(server: Server, body, chat: bool) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids, and its text for echo; on a thread of its own (a prompt of megabytes takes a while,
    and the event loop serves everybody). A prompt the tokenizer or the chat template refuses is a 400."""
    tok = server.tokenizer
    if chat and server.template is None:
        raise OpenAIError(400, f"messages: {NO_TEMPLATE} when starting the server, or use /v1/completions")
    tools = body.tool_dicts()
    if tools and server.tool_format is None:
        raise OpenAIError(400, f"tools: the chat template ({server.template.name}) does not show the model tools in "
                          "a format this server reads calls in (Qwen's <tool_call>, Llama-3.1's JSON)", param="tools")

    def work():
        check_unicode(body.prompts())
        if chat:
            prompts = [server.template.encode(messages, tools=tools) for messages in body.prompts()]
            return prompts, [""] * len(prompts)
        prompts = [tok.encode(p, bos=body.add_special_tokens) if isinstance(p, str) else list(p)
                   for p in body.prompts()]
        echoed = [(p if isinstance(p, str) else tok.decode(p)) if body.echo else "" for p in body.prompts()]
        return prompts, echoed
    try:
        prompts, echoed = await asyncio.to_thread(work)
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        # a lone surrogate, turns out of order, a template meeting a value it cannot take (a null content)
        raise OpenAIError(400, f"{'messages' if chat else 'prompt'}: {e}") from None
    n = body.n
    return prompts, [text for text in echoed for _ in range(n)]


async def constrain(server: Server, body, requests: list[Request]) -> list[Request]:
    """Structured output, and calls a request requires: each request's grammar matcher (compiled once, then
    cached), on a thread of its own; a schema the grammar library cannot enforce is a 400."""
    structured, calls, tools = body.structured(), body.calls_tools(), body.tool_dicts()
    if structured is None and calls not in ("required", "named"):
        return requests
    grammars, param = server.engine.grammars, "response_format" if structured else "tools"
    named = body.tool_choice.function.name if calls == "named" else None

    def work():
        for r in requests:  # each its own matcher (copies of one compiled grammar)
            if structured:
                r.grammar = grammars.matcher(*structured)
            else:
                r.grammar = grammars.tool_matcher(server.tool_format, tools, named, body.parallel_tool_calls)
    try:
        await asyncio.to_thread(work)
    except GrammarError as e:
        raise OpenAIError(400, f"{param}: the schema cannot be enforced: {e}", param=param) from None
    return requests


def check_unicode(prompts: list):
    """JSON can carry a lone surrogate ("\\ud800"), which no tokenizer can encode: say so."""
    text = json.dumps(prompts, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate, {text[e.start]!r}") from None


class RequireKey:
    """'Authorization: Bearer KEY' on the GUARDED routes. Plain ASGI: FastAPI's @app.middleware("http") would hide
    a client's disconnect from the handlers (a non-streaming request would then run to its end for nobody)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(GUARDED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = OpenAIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
                return await JSONResponse(error.body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llama-fast", docs_url=None, redoc_url=None, openapi_url=None)
    handle_errors(app)
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    add_routes(app, server)
    return app


def handle_errors(app: FastAPI):
    """Every error in OpenAI's shape: our refusals, FastAPI's 404 and 405, and a body that does not validate
    (FastAPI's 422) as a 400 naming the field."""

    @app.exception_handler(OpenAIError)
    async def refused(request, e: OpenAIError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # 404, 405: in OpenAI's shape too
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(OpenAIError(e.status_code, message, kind).body, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(OpenAIError(400, f"the body is not valid JSON ({first['ctx']['error']} at "
                                                 f"character {first['loc'][-1]})").body, status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        if not where and first["type"] in ("model_attributes_type", "dict_type", "missing"):
            first["msg"] = "the body must be a JSON object, sent as Content-Type: application/json"
        if first["type"] == "extra_forbidden":
            first["msg"] = "unknown field (not in OpenAI's API or this server's extensions: README, Serving)"
        message = f"{where}: {first['msg']}" if where else first["msg"].removeprefix("Value error, ")
        return JSONResponse(OpenAIError(400, message, param=where or None).body, status_code=400)


def add_routes(app: FastAPI, server: Server):
    @app.get("/health")
    async def health():
        if server.failed:
            return JSONResponse({"status": "failed", "reason": server.failed}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.registry).decode(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "llama-fast",
                "max_model_len": server.engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(server, name, status=404)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await complete(server, http, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        return await complete(server, http, body)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest):
        check_model(server, body.model or server.model_name)
        prompts, _ = await tokenize(server, body, chat=body.messages is not None)
        return {"tokens": prompts[0], "count": len(prompts[0]), "max_model_len": server.engine.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(server, body.model or server.model_name)
        vocab = server.tokenizer.vocab_size
        if not all(0 <= t < vocab for t in body.tokens):
            raise OpenAIError(400, f"tokens: ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(server.tokenizer.decode, body.tokens)}


async def complete(server: Server, http: HTTPRequest, body):
    """A completions or chat completions request: its prompts tokenized, its choices constrained if asked, run."""
    chat = isinstance(body, ChatRequest)
    check_model(server, body.model)
    prompts, echoed = await tokenize(server, body, chat)
    requests = await constrain(server, body, engine_requests(server, body, prompts, chat))
    return await respond(server, http, body, requests, echoed)


def check_model(server: Server, name: str, status: int = 400):
    if name != server.model_name:
        raise OpenAIError(status, f"model {name!r} is not served here; this server has {server.model_name!r}",
                          param="model", code="model_not_found")


async def respond(server: Server, http: HTTPRequest, body, requests: list[Request], echoed: list[str]):
    """The whole answer as one JSON body, or (stream) its pieces as server-sent events ending with [DONE]."""
    chat = isinstance(body, ChatRequest)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{requests[0].id}", "created": int(time.time()),
            "model": server.model_name}
    tools = body.calls_tools()  # "auto", "required" or "named": the replies may be tool calls
    outputs = server.run(requests)
    if not body.stream:
        if not await finished_unless_gone(outputs, http):
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        if chat:
            return chat_response(body, requests, server.tokenizer, head, server.tool_format if tools else None)
        return completion_response(body, requests, echoed, server.tokenizer, head)
    first = await anext(outputs)  # errors (a prompt too long, a busy server) still become a status code

    async def events():
        given, started = [0] * len(requests), set()
        held = [ToolCallStream(server.tool_format, tools != "auto") if tools else None for _ in requests]
        scores = not chat and body.logprobs is not None  # (text offsets: only completions' logprobs have them)
        offsets = [len(server.tokenizer.decode(r.prompt)) if scores and not body.echo else 0 for r in requests]
        try:
            async for i, text, tokens, finish_reason in prepend(first, outputs):
                r = requests[i]
                scored = scored_output(r, given[i], given[i] + len(tokens)) if r.logprobs is not None else []
                given[i] += len(tokens)
                extra = {"tools": held[i]} if chat else {}
                make = chat_chunk if chat else completion_chunk
                for event in make(body, i, r, text, scored, finish_reason, i not in started, echoed[i],
                                  server.tokenizer, head, offsets[i], **extra):
                    offsets[i] += sum(map(len, (event["choices"][0].get("logprobs") or {}).get("tokens", [])))
                    yield f"data: {json.dumps(event)}\n\n"
                started.add(i)
            if body.include_usage():
                yield f"data: {json.dumps(usage_chunk(body, requests, head, chat))}\n\n"
        except OpenAIError as e:  # the status was sent with the first event: the error is an event (as vLLM's)
            yield f"data: {json.dumps(e.body)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


async def finished_unless_gone(outputs, http: HTTPRequest) -> bool:
    """Run the outputs to their end (True), unless the client disconnects first: then they are cancelled, their
    requests aborted and their blocks freed (False)."""
    async def drain():
        async for _ in outputs:
            pass
    task = asyncio.ensure_future(drain())
    while not task.done():
        await asyncio.wait([task], timeout=CLIENT_POLL_S)
        if not task.done() and await http.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
    task.result()  # an OpenAIError becomes its status code
    return True


async def prepend(first, rest):
    yield first
    async for item in rest:
        yield item
