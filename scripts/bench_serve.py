"""Load an OpenAI-compatible server (ours, vLLM, llama.cpp's llama-server, `transformers serve`) with a workload and
measure what its clients see.

    python scripts/bench_serve.py --url http://127.0.0.1:8000/v1 --num_requests 64 --prompt_tokens 32 256 \\
        --output_tokens 64 256 --concurrency 16 --json out.json

Each request is a streamed POST /completions of random token ids (or, with --text_prompts, random words: for servers
that take only text; or, with --prompt_file, the texts of a JSON-lines file in turn) with max_tokens drawn from
--output_tokens, greedy, ignore_eos. Requests are sent with a fixed
number in flight (--concurrency) or arriving as a Poisson process (--rate requests/s). Reported: output tokens/s
and requests/s over the run, time to first token (TTFT), inter-token latency (ITL: the gaps between streamed
chunks) and time per output token (TPOT: (last - first) / (tokens - 1)), p50 and p99; the JSON has every request.
"""
import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llama_fast.writing import write_json  # noqa: E402
from llama_fast.cli import check_at_least, check_output_path, cli_main  # noqa: E402

WORDS = "the a small big red old new dog cat bird tree house river city king queen runs sees makes and but".split()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the API's base URL")
    p.add_argument("--model", help="model name (default: the first /models lists)")
    p.add_argument("--api_key", default="none")
    p.add_argument("--num_requests", type=int, default=64)
    p.add_argument("--prompt_tokens", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--output_tokens", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX"))
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (unless --rate)")
    p.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s instead")
    p.add_argument("--vocab", type=int, nargs=2, default=[3, 1000], metavar=("MIN_ID", "MAX_ID"),
                   help="range of the random prompt token ids")
    p.add_argument("--text_prompts", action="store_true", help="prompts of random words (one word ~ one token)")
    p.add_argument("--prompt_file", type=Path, help="prompts from this file instead, one JSON object "
                   "{\"prompt\": text} a line, taken in turn (a workload of real text: e.g. passages to repeat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculation", type=int, nargs=2, metavar=("N", "K"), help="ask our server for prompt lookup "
                   "with N-grams, K tokens proposed per step (its \"speculation\" field)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a request may take")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def workload(args) -> list:
    rng = random.Random(args.seed)
    texts = read_prompt_file(args.prompt_file) if args.prompt_file else None
    jobs = []
    for i in range(args.num_requests):
        if texts:  # (its length in tokens comes back in the usage)
            jobs.append({"prompt": texts[i % len(texts)], "prompt_tokens": None,
                         "max_tokens": rng.randint(*args.output_tokens)})
            continue
        n = rng.randint(*args.prompt_tokens)
        prompt = (" ".join(rng.choice(WORDS) for _ in range(n)) if args.text_prompts else
                  [rng.randint(*args.vocab) for _ in range(n)])
        jobs.append({"prompt": prompt, "prompt_tokens": n, "max_tokens": rng.randint(*args.output_tokens)})
    return jobs


def read_prompt_file(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                prompt = None
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{i}: not a JSON object with a \"prompt\" string")
            texts.append(prompt)
    if not texts:
        raise ValueError(f"{path} has no prompts")
    return texts


async def sse_lines(chunks):
    """The lines of a server-sent event stream: ended by \\n, \\r\\n or \\r only, as the SSE format says, so that a
    U+2028 or U+0085 inside an event's JSON (llama-server writes them raw) does not cut it in two, as httpx's
    aiter_lines (str.splitlines) does."""
    rest = ""
    async for chunk in chunks:
        text = rest + chunk
        held = "\r" if text.endswith("\r") else ""  # perhaps half of a \r\n
        *lines, rest = text.removesuffix(held).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        rest += held
        for line in lines:
            yield line
    if rest.removesuffix("\r"):
        yield rest.removesuffix("\r")


async def one_request(client: httpx.AsyncClient, args, job: dict) -> dict:
    body = {"model": args.model, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if args.speculation:
        body["speculation"] = {"prompt_lookup": args.speculation[0], "k": args.speculation[1]}
    t0, times, tokens = time.perf_counter(), [], None
    async with client.stream("POST", args.url + "/completions", json=body) as r:
        if r.status_code != 200:
            raise ValueError(f"{args.url}/completions answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in sse_lines(r.aiter_text()):
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
                job["prompt_tokens"] = job["prompt_tokens"] or event["usage"].get("prompt_tokens")
            if event.get("choices") and event["choices"][0].get("text"):
                times.append(time.perf_counter() - t0)
    tokens = tokens or len(times)
    return {"prompt_tokens": job["prompt_tokens"], "output_tokens": tokens, "ttft": times[0] if times else None,
            "latency": time.perf_counter() - t0, "itl": [b - a for a, b in zip(times, times[1:])],
            "tpot": (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None}


async def run_workload(args, jobs: list) -> tuple[list, float]:
    # a connection per request: a server may close an idle kept-alive one just as it is reused (llama-server does)
    limits = httpx.Limits(max_connections=max(args.concurrency, 64), max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:
        if args.model is None:
            args.model = (await client.get(args.url + "/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        if args.rate:  # Poisson arrivals: exponential gaps
            rng, tasks = random.Random(args.seed + 1), []
            for job in jobs:
                tasks.append(asyncio.create_task(one_request(client, args, job)))
                await asyncio.sleep(rng.expovariate(args.rate))
            results = await asyncio.gather(*tasks)
        else:
            gate = asyncio.Semaphore(args.concurrency)

            async def gated(job):
                async with gate:
                    return await one_request(client, args, job)
            results = await asyncio.gather(*(gated(job) for job in jobs))
        return results, time.perf_counter() - t0


def percentiles(values: list) -> dict:
    values = sorted(v for v in values if v is not None)
    if not values:
        return {"p50": None, "p99": None}
    at = lambda q: values[min(len(values) - 1, round(q * (len(values) - 1)))]  # noqa: E731
    return {"p50": at(0.5), "p99": at(0.99), "mean": statistics.fmean(values)}


def summarize(args, results: list, seconds: float) -> dict:
    out_tokens = sum(r["output_tokens"] for r in results)
    return {"url": args.url, "model": args.model, "num_requests": len(results), "concurrency": args.concurrency,
            "rate": args.rate, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            "seconds": seconds, "output_tokens_per_s": out_tokens / seconds, "requests_per_s": len(results) / seconds,
            "total_output_tokens": out_tokens, "ttft_s": percentiles([r["ttft"] for r in results]),
            "itl_s": percentiles([x for r in results for x in r["itl"]]),
            "tpot_s": percentiles([r["tpot"] for r in results])}


def check_min_max(args, *names):
    """Each named MIN MAX flag of args has 1 <= MIN <= MAX."""
    for name in names:
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            raise ValueError(f"--{name} {low} {high}: need 1 <= MIN <= MAX")


def run(args) -> int:
    check_at_least(args, num_requests=1, concurrency=1, timeout=1)
    if args.rate is not None and not args.rate > 0:
        raise ValueError(f"--rate must be > 0, not {args.rate}")
    check_min_max(args, "prompt_tokens", "output_tokens", "vocab")
    check_output_path(args.json, "--json")
    if args.prompt_file and args.text_prompts:
        raise ValueError("--prompt_file and --text_prompts are two sources of prompts: give one")
    try:
        results, seconds = asyncio.run(run_workload(args, workload(args)))
    except httpx.TransportError as e:
        raise ValueError(f"cannot reach {args.url}: {e}") from None
    summary = summarize(args, results, seconds)
    ms = lambda d: f"{d['p50'] * 1e3:.0f} / {d['p99'] * 1e3:.0f} ms" if d["p50"] is not None else "-"  # noqa: E731
    print(f"{summary['num_requests']} requests in {seconds:.1f} s: {summary['output_tokens_per_s']:.1f} output "
          f"tokens/s, {summary['requests_per_s']:.2f} requests/s; TTFT p50/p99 {ms(summary['ttft_s'])}, ITL "
          f"{ms(summary['itl_s'])}, TPOT {ms(summary['tpot_s'])}")
    if args.json:
        write_json(args.json, {**summary, "requests": results})
    return 0


if __name__ == "__main__":
    cli_main(run, build_parser().parse_args())
