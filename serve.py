"""An OpenAI-compatible HTTP server over the serving engine (engine.py): many clients at once, continuously batched.

    python serve.py --checkpoint_path checkpoints/<repo>/model.pth [--compile] [--port 8000]

This file is the command: its flags, loading the model, starting and stopping. The routes (completions and chat
completions, streamed or not, models, tokenize, health, metrics) are llama_fast/serving/routes.py; the engine's loop
and what the handlers ask of it, server.py. FastAPI + uvicorn carry the HTTP on a thread of their own; the engine
runs on the main thread and hands each request's text to the event loop as it is produced. Binds 127.0.0.1 unless
--host says otherwise.
"""
from llama_fast.cli import (PRECISIONS, add_kv_cache_arg, add_model_args, check_at_least,  # first, before torch
                            check_device, check_memory, cli_main)
import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from llama_fast.chat.templates import chat_template
from llama_fast.chat.tool_calls import tool_call_format
from llama_fast.checkpoint import check_is_file, check_vocab, load_model, tokenizer_file
from llama_fast.serving.engine import KV_CACHE_CLASSES, Engine, EngineConfig
from llama_fast.serving.request import MAX_LOOKUP
from llama_fast.serving.routes import create_app
from llama_fast.serving.runner import stop_workers, token_bytes, worker_loop
from llama_fast.serving.server import Server
from tokenizer import load_tokenizer
import tp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a Llama-family model over an OpenAI-compatible HTTP API.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", help="the model's name in the API (default: the checkpoint's folder)")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
                   "(default: $LLAMA_FAST_API_KEY if set)")
    p.add_argument("--chat_template", metavar="NAME_OR_FILE", help="the chat format: llama2, llama3, a Jinja file "
                   "or a tokenizer_config.json (default: the tokenizer_config.json beside the tokenizer; without "
                   "one, chat requests are refused)")
    p.add_argument("--max_model_len", type=int, default=0, help="the longest context served, prompt and output "
                   "(default: the model's); a shorter one lets a smaller KV cache hold a full context")
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
    p.add_argument("--itl_target_ms", type=float, default=EngineConfig.itl_target_ms, metavar="MS",
                   help="a step with decoding rows reads only as many prompt tokens beside them as fit in MS "
                   "milliseconds, timed as the server runs (0: 1.75x the decoding rows' own time, and at least the "
                   "prompt tokens the load brings per step; inf: the token budget alone)")
    p.add_argument("--prompt_lookup", type=int, default=0, metavar="N", help="greedy requests speculate by prompt "
                   "lookup with N-grams unless they say otherwise (\"speculation\" field; 0: off)")
    p.add_argument("--speculate_k", type=int, default=EngineConfig.speculate_k, help="tokens prompt lookup proposes "
                   "per step")
    p.add_argument("--max_waiting", type=int, default=256, help="more waiting requests than this get a 503")
    p.add_argument("--no_prefix_caching", action="store_true", help="never reuse the KV blocks of a shared prefix")
    p.add_argument("--grace_period", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM or Ctrl-C")
    return p


def model_name_of(checkpoint_path: Path) -> str:
    """checkpoints/meta-llama/Llama-3.2-1B/model.pth -> meta-llama/Llama-3.2-1B; otherwise the folder's name."""
    parts = checkpoint_path.resolve().parent.parts
    if "checkpoints" in parts[:-1]:
        return "/".join(parts[len(parts) - parts[::-1].index("checkpoints"):])
    return parts[-1]


def check_port(host: str, port: int):
    """Fail before the model loads, not after, when the address cannot be listened on."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def load(args):
    """(tokenizer, chat template or None, model) of args.checkpoint_path; with --compile, the model has the CPU
    kernels of compiled steps (on a small model, inductor's loop for one token: choice.default_kernels)."""
    check_is_file(args.checkpoint_path, "checkpoint")
    tokenizer = load_tokenizer(tokenizer_file(args.checkpoint_path, args.tokenizer_path))
    template = chat_template(tokenizer, args.chat_template)
    model = load_model(args.checkpoint_path, args.device, PRECISIONS[args.precision], tp.world_size() > 1,
                       args.cpu_kernels, args.compile, cpu_gemm=args.cpu_gemm)
    check_vocab(tokenizer, model)
    return tokenizer, template, model


def start(args):
    """(model, tokenizer, chat template or None, engine): the checkpoint loaded and the engine built, compiled and
    warmed up if asked."""
    t0 = time.perf_counter()
    tokenizer, template, model = load(args)
    check_kv_cache_memory(args, model)
    config = EngineConfig(max_batch_size=args.max_batch_size, block_size=args.block_size,
                          max_model_len=args.max_model_len,
                          kv_cache_tokens=args.kv_cache_tokens, kv_cache_gb=args.kv_cache_gb,
                          max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk=args.prefill_chunk,
                          itl_target_ms=args.itl_target_ms,
                          prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                          prompt_lookup=args.prompt_lookup,
                          speculate_k=args.speculate_k, compile=args.compile)
    engine = Engine(model, tokenizer, config)
    pool = (engine.runner.n_blocks - 1) * args.block_size
    if pool < engine.context:  # a request of a full context could never be served
        raise ValueError(f"the KV cache holds {pool} tokens, fewer than one full context ({engine.context}): give it "
                         "more (--kv_cache_tokens, --kv_cache_gb) or serve a shorter context (--max_model_len)")
    t1 = time.perf_counter()
    engine.grammars.matcher(None)  # structured output's vocabulary, read now rather than in a client's request
    print(f"Read the vocabulary for structured output in {time.perf_counter() - t1:.1f}s", file=sys.stderr)
    # every kind of step compiled before the first client, not in the middle of live traffic, and a few steps timed
    # for the time target (Engine.time_first_steps); under tensor parallelism rank 0 runs the steps and the other
    # ranks the same passes, from their worker_loop (steps of their own would wait in collectives rank 0 never makes)
    if tp.rank() == 0 and args.compile:
        t1 = time.perf_counter()
        engine.warm_up()
        graphs = f" (CUDA graphs of {len(engine.runner.decode_shapes())} decode shapes)" if engine.runner.padded else ""
        print(f"Compiled the forward pass for every kind of step{graphs} in {time.perf_counter() - t1:.1f}s",
              file=sys.stderr)
    elif tp.rank() == 0:
        engine.time_first_steps()
    tools = tool_call_format(template)
    print(f"Chat template: {template.name}; tool calls: {tools.name if tools else 'none'}" if template else
          "Chat: none (this checkpoint has no chat template; --chat_template gives one)", file=sys.stderr)
    print(f"Loaded {args.checkpoint_path} in {time.perf_counter() - t0:.1f}s: KV cache of "
          f"{engine.runner.n_blocks - 1} blocks x {args.block_size} tokens ({args.kv_cache_dtype}, "
          f"{engine.runner.pool_bytes / 2**30:.2f} GiB)", file=sys.stderr)
    return model, tokenizer, template, engine


def check_kv_cache_memory(args, model):
    """A pool the user sized is checked against the free memory before it is allocated."""
    per_token = token_bytes(model, KV_CACHE_CLASSES[args.kv_cache_dtype])
    if args.kv_cache_tokens or args.kv_cache_gb:
        nbytes = args.kv_cache_tokens * per_token if args.kv_cache_tokens else int(args.kv_cache_gb * 2**30)
        check_memory(nbytes, args.device, f"a KV cache of {nbytes // per_token} tokens",
                     " (--kv_cache_tokens, --kv_cache_gb)")


def api_key_of(args) -> str | None:
    """--api_key, else $LLAMA_FAST_API_KEY; an empty key (what an unset shell variable gives) would turn
    authentication off, and one that is not printable ASCII could never match a header: both refused."""
    key = args.api_key if args.api_key is not None else os.environ.get("LLAMA_FAST_API_KEY")
    if key is None:
        return None
    where = "--api_key" if args.api_key is not None else "LLAMA_FAST_API_KEY"
    if not key:
        raise ValueError(f"{where} is empty (an unset variable?): give a key, or none to serve without one")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError(f"{where} must be printable ASCII without spaces (it is sent in an HTTP header)")
    return key


def check_args(args):
    """Every number in range, before anything loads."""
    check_at_least(args, port=0, max_model_len=0, max_batch_size=1, block_size=1, kv_cache_tokens=0, kv_cache_gb=0,
                   prefill_chunk=0, max_num_batched_tokens=args.max_batch_size, prompt_lookup=0, speculate_k=1,
                   max_waiting=1, grace_period=0)
    if not args.itl_target_ms >= 0:  # (inf is a setting: no time limit)
        raise ValueError(f"--itl_target_ms must be >= 0 (0: the default target) or inf, got "
                         f"{args.itl_target_ms}")
    if args.prompt_lookup > MAX_LOOKUP or args.speculate_k > MAX_LOOKUP:
        raise ValueError(f"--prompt_lookup and --speculate_k must be at most {MAX_LOOKUP}")
    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, not {args.port}")
    if not args.host.strip():
        raise ValueError("--host is empty: give an address (127.0.0.1, or 0.0.0.0 for every interface)")
    check_device(args.device)


def run(args) -> int:
    check_args(args)
    api_key = api_key_of(args)
    if int(os.environ.get("RANK", "0")) == 0:
        check_port(args.host, args.port)
    args.device = tp.maybe_init_dist(args.device)
    model, tokenizer, template, engine = start(args)
    if tp.rank() != 0:  # rank 0 tells this rank what to compute, and when to stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        worker_loop(engine.runner)
        return 0
    name = args.model_name or model_name_of(args.checkpoint_path)
    server = Server(engine, tokenizer, template, name, args.max_waiting)
    app = create_app(server, api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace_period)
    http = uvicorn.Server(config)

    def serve_http():
        try:
            http.run()
        finally:
            server.stopping.set()

    def stop(*_):
        """As uvicorn would: stop accepting, let running requests finish; a second signal: at once. Requests still
        running a second before the grace period ends are aborted, so that their clients get an error and
        [DONE] before the connections close."""
        if not http.should_exit:
            deadline = threading.Timer(max(args.grace_period - 1, 0), server.abort_all)
            deadline.daemon = True  # the process exits as soon as the requests are done, not when this fires
            deadline.start()
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
        port = http.servers[0].sockets[0].getsockname()[1]  # --port 0: the port the system chose
        print(f"Serving {server.model_name} at http://{args.host}:{port}/v1", file=sys.stderr, flush=True)
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
