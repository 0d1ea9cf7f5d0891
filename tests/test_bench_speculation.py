"""The speculation benchmarks run end to end and report what BENCHMARKS.md quotes: scripts/bench.py with
--lookahead and --prompt_lookup (tokens per step, acceptance, step cost, a speed-up over plain decoding of the same
model), scripts/plot_speculation.py on their metrics (table rows and a PNG), scripts/bench_lookahead_cost.py (the
step's cost against a 1-token step). Speed itself is measured in BENCHMARKS.md, not here."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args, timeout=600):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def bench(tmp_path, name, *method):
    metrics = tmp_path / f"{name}.json"
    proc = run("scripts/bench.py", "--model", "stories15M", "--device", "cpu", "--precision", "float32",
               "--max_new_tokens", "24", "--num_samples", "1", *method, "--metrics_json", metrics)
    assert proc.returncode == 0, proc.stderr
    return json.loads(metrics.read_text())


def test_bench_and_plot_speculation(tmp_path):
    look = bench(tmp_path, "lookahead", "--lookahead", "3", "--lookahead_ngram", "3", "--lookahead_guesses", "2")
    assert look["proposer"] == "lookahead W=3 N=3 G=2" and look["speculate_k"] == 2
    assert sum(look["tokens_per_step_histogram"]) == look["lookahead_steps"] > 0
    histogram_mean = sum((n + 1) * c for n, c in enumerate(look["tokens_per_step_histogram"])) / look["lookahead_steps"]
    assert abs(look["tokens_per_step"] - histogram_mean) < 1e-9
    assert look["identical_outputs"] == "1/1"  # float32: the same tokens as plain greedy decoding
    assert look["step_cost"] > 0 and look["speedup"] > 0 and 0 <= look["acceptance_rate"] <= 1
    lookup = bench(tmp_path, "lookup", "--prompt_lookup", "2", "--speculate_k", "4")
    assert lookup["proposer"].startswith("prompt lookup") and lookup["identical_outputs"] == "1/1"

    png = tmp_path / "plot.png"
    proc = run("scripts/plot_speculation.py", tmp_path / "lookahead.json", tmp_path / "lookup.json", "--out", png)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| stories15M")]
    assert len(rows) == 2 and "lookahead W=3 N=3 G=2" in rows[0] and f"**{look['speedup']:.2f}x**" in rows[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run("scripts/plot_speculation.py", tmp_path / "lookup.json", "--out", png)  # no --force: kept
    assert again.returncode != 0 and "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"tokens_per_sec": 1.0}))
    proc = run("scripts/plot_speculation.py", plain, "--out", tmp_path / "p.png")
    assert proc.returncode != 0 and "not a speculative run" in proc.stderr


def test_lookahead_cost_table(tmp_path):
    metrics = tmp_path / "cost.json"
    proc = run("scripts/bench_lookahead_cost.py", "--model", "stories15M", "--configs", "1,2,1", "--repeats", "5",
               "--context", "64", "--precision", "float32", "--device", "cpu", "--metrics_json", metrics)
    assert proc.returncode == 0, proc.stderr
    assert "| 1 | 2 | 1 | 2 |" in proc.stdout
    (row,) = json.loads(metrics.read_text())["models"]["stories15M"]
    assert row["tokens"] == 2 and row["step_ms"] > 0 and row["one_token_ms"] > 0
    assert abs(row["cost"] - row["step_ms"] / row["one_token_ms"]) < 1e-9
