"""Ours, transformers' continuous batching and llama.cpp's server, side by side on the same random weights: each
engine is started as an OpenAI-compatible server, loaded by scripts/bench_serve.py at each concurrency, stopped.

    python scripts/bench_serve_compare.py --tokenizer_path llama2-tokenizer.model --model stories110M \\
        --llama_cpp ~/llama.cpp --concurrency 1 4 16 --work_dir /tmp/serve-bench --out serve.json --plot serve.png

One random LlamaForCausalLM of the preset's shape (scripts/bench_llamacpp.py's, seed 0) in bf16 serves as
    ours:          serve.py --compile --precision bfloat16 on our conversion of it, over HTTP
    llama.cpp:     llama-server -t THREADS -np <concurrency> on llama.cpp's BF16 GGUF of it, over HTTP
    transformers:  its continuous batching (init_continuous_batching: paged attention, its own scheduler) in this
                   process, bf16, fed the same requests with the same number in flight, its per-token timestamps
                   giving TTFT and ITL (no HTTP: `transformers serve` needs a tokenizer this random model lacks)
Each gets the same workload (--num_requests, --prompt_tokens, --output_tokens, token-id prompts, ignore_eos); the
resident memory of the server process (of this process for transformers), peak (VmHWM) and after the
workload (VmRSS), is read from /proc.
"""
import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import bench_serve  # noqa: E402
from bench_llamacpp import random_hf_model, run  # noqa: E402

ENGINES = ("ours", "transformers", "llama.cpp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer_path", type=Path, required=True, help="a Llama-2 tokenizer.model (32000 tokens)")
    p.add_argument("--model", default="stories110M")
    p.add_argument("--llama_cpp", type=Path, help="llama.cpp checkout with build/bin/llama-server (else skipped)")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num_requests", type=int, default=64)
    p.add_argument("--prompt_tokens", type=int, nargs=2, default=[32, 256])
    p.add_argument("--output_tokens", type=int, nargs=2, default=[64, 256])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ours_args", default="", help="more serve.py flags, e.g. '--max_num_batched_tokens 128'")
    p.add_argument("--work_dir", type=Path, required=True, help="the converted models are kept here")
    p.add_argument("--out", type=Path, help="results as JSON")
    p.add_argument("--plot", type=Path, help="output tokens/s against concurrency, as a PNG (needs matplotlib)")
    p.add_argument("--transformers_only", type=Path, help=argparse.SUPPRESS)
    return p


def prepare(args) -> dict:
    hf = args.work_dir / f"hf-{args.model}"
    if not (hf / "model.pth").is_file():
        random_hf_model(args.model, args.tokenizer_path, hf)
        run([sys.executable, ROOT / "scripts" / "convert_hf_checkpoint.py", "--checkpoint_dir", hf])
    gguf = args.work_dir / f"{args.model}-BF16.gguf"
    if args.llama_cpp and not gguf.is_file():
        run([sys.executable, args.llama_cpp / "convert_hf_to_gguf.py", hf, "--outtype", "bf16", "--outfile", gguf])
    return {"hf": hf, "gguf": gguf}


def transformers_run(paths: dict, args, concurrency: int) -> dict:
    """transformers' continuous batching on the workload, `concurrency` requests in flight at a time."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    load = workload_args(args, concurrency, "unused")
    jobs = bench_serve.workload(load)
    model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.bfloat16)
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=None))
    manager.start()
    manager.add_request(jobs[0]["prompt"], max_new_tokens=4)
    manager.get_result(timeout=600)  # warm-up
    pending, in_flight, results = list(jobs), {}, []

    def submit():
        job = pending.pop(0)
        t0 = time.perf_counter()
        in_flight[manager.add_request(job["prompt"], max_new_tokens=job["max_tokens"], record_timestamps=True)] = \
            (job, t0)
    t_start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        submit()
    while in_flight:
        out = manager.get_result(timeout=3600)
        if out is None:
            sys.exit("error: transformers' continuous batching stopped answering")
        job, t0 = in_flight.pop(out.request_id)
        times = [t - t0 for t in out.timestamps]
        n = len(out.generated_tokens)
        results.append({"prompt_tokens": job["prompt_tokens"], "output_tokens": n, "ttft": times[0],
                        "latency": times[-1], "itl": [b - a for a, b in zip(times, times[1:])],
                        "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else None})
        if pending:
            submit()
    seconds = time.perf_counter() - t_start
    manager.stop(block=True)
    load.model = "transformers"
    return {**bench_serve.summarize(load, results, seconds), "engine": "transformers", **rss_gb(os.getpid())}


def workload_args(args, concurrency: int, url: str):
    return bench_serve.build_parser().parse_args([
        "--url", url, "--num_requests", str(args.num_requests), "--concurrency", str(concurrency),
        "--prompt_tokens", *map(str, args.prompt_tokens), "--output_tokens", *map(str, args.output_tokens),
        "--vocab", "3", "31999"])


def server_command(engine: str, paths: dict, args, port: int, concurrency: int) -> list:
    if engine == "ours":
        return [sys.executable, ROOT / "serve.py", "--checkpoint_path", paths["hf"] / "model.pth", "--compile",
                "--precision", "bfloat16", "--device", "cpu", "--port", port, "--model_name", "m",
                "--max_batch_size", max(concurrency, 1), *shlex.split(args.ours_args)]
    context = 2 * (args.prompt_tokens[1] + args.output_tokens[1])  # per slot, with room to spare
    return [args.llama_cpp / "build" / "bin" / "llama-server", "-m", paths["gguf"], "-t", args.threads, "-np",
            concurrency, "-c", concurrency * context, "--port", port, "--host", "127.0.0.1", "-a", "m"]


def start(cmd: list, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: {cmd[0]} exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"error: {cmd[0]} did not start in 15 minutes; see {log}")


def rss_gb(pid: int) -> dict:
    """Resident memory of a process: its peak (VmHWM, loading included) and now (VmRSS, after the workload)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    gb = lambda key: int(status[key].split()[0]) / 2**20  # noqa: E731 (kB)
    return {"peak_rss_gb": gb("VmHWM"), "end_rss_gb": gb("VmRSS")}


def one_run(engine: str, paths: dict, args, concurrency: int) -> dict:
    if engine == "transformers":  # in a process of its own, so that its peak memory is its own
        out = args.work_dir / f"transformers-{concurrency}.json"
        run([sys.executable, __file__, "--transformers_only", out, *sys.argv[1:]])
        return json.loads(out.read_text())
    port = bench_serve_port()
    proc = start(server_command(engine, paths, args, port, concurrency), port,
                 args.work_dir / f"{engine}-{concurrency}.log")
    try:
        load = workload_args(args, concurrency, f"http://127.0.0.1:{port}/v1")
        results, seconds = asyncio.run(bench_serve.run_workload(load, bench_serve.workload(load)))
        summary = bench_serve.summarize(load, results, seconds)
        summary.update(engine=engine, **rss_gb(proc.pid))
        return summary
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_serve_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list) -> str:
    ms = lambda d: f"{d['p50'] * 1e3:.0f} / {d['p99'] * 1e3:.0f}"  # noqa: E731
    lines = ["| engine | concurrency | output tok/s | requests/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
             "| RSS peak / end GB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        end = f"{r['end_rss_gb']:.2f}" if "end_rss_gb" in r else "–"  # JSON from before end RSS was recorded
        lines.append(f"| {r['engine']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.3f} | {ms(r['ttft_s'])} | {ms(r['itl_s'])} | "
                     f"{r['peak_rss_gb']:.2f} / {end} |")
    return "\n".join(lines)


def plot(rows: list, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        ax.plot([r["concurrency"] for r in mine], [r["output_tokens_per_s"] for r in mine], "o-", label=engine)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s", title=title)
    ax.set_xticks(sorted({r["concurrency"] for r in rows}), labels=sorted({r["concurrency"] for r in rows}))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = build_parser().parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.transformers_only:  # one_run's child: one concurrency, the result as JSON
        concurrency = int(args.transformers_only.stem.rsplit("-", 1)[1])
        args.transformers_only.write_text(json.dumps(transformers_run(prepare(args), args, concurrency)))
        return
    if "llama.cpp" in args.engines and not args.llama_cpp:
        args.engines.remove("llama.cpp")
    paths, rows = prepare(args), []
    for concurrency in args.concurrency:
        for engine in args.engines:
            rows.append(one_run(engine, paths, args, concurrency))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.out:
                args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "runs": rows}, indent=1))
    print(table(rows))
    if args.plot:
        plot(rows, args.plot, f"{args.model}, bf16, {args.threads} threads")


if __name__ == "__main__":
    main()
