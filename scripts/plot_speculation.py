"""Speed-up against acceptance for speculative methods, from scripts/bench.py's --metrics_json files (runs with
--draft*, --prompt_lookup or --lookahead): a markdown table on stdout and a plot.

    python scripts/plot_speculation.py runs/*.json --out speculation.png

Each run is a point (acceptance rate = accepted tokens / proposed per step, measured speed-up over plain decoding
of the same target in the same process) on its method's expectation line: speed-up = tokens per step / step cost
= (1 + K * rate) / c, with K the tokens a step can accept and c what a step cost against a plain decode step in that
run. The line crosses 1 at the break-even rate (c - 1) / K; the dotted line is the ideal of a free proposal (c = 1).
A point lies below its line by the time outside speculative steps: plain decode steps where there was no proposal
(prompt lookup without a match) or no room in the cache, and the per-run bookkeeping.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import check_output_path, cli_main, read_text_file  # noqa: E402


def load_runs(paths: list) -> list:
    runs = []
    for path in paths:
        run = json.loads(read_text_file(path, "metrics file"))
        if "speedup" not in run:
            raise ValueError(f"{path} is not a speculative run of scripts/bench.py (no speed-up in it)")
        runs.append(run)
    return runs


def method(run: dict) -> str:
    """The family a run's proposer belongs to (bench.py's proposer text: "draft: PATH", "int4 copy", "prompt
    lookup, 3-grams", "lookahead W=.. N=.. G=..")."""
    proposer = run["proposer"]
    return "lookahead" if proposer.startswith("lookahead") else (
        "prompt lookup" if proposer.startswith("prompt lookup") else "draft model")


def name(path: str) -> str:
    """A checkpoint's folder name (model.pth files are told apart by their folder), or a preset's name."""
    return Path(path).parent.name if path.endswith((".pth", ".safetensors")) else path


def describe(run: dict) -> str:
    proposer = run["proposer"]
    if proposer.startswith("draft: "):
        proposer = "draft " + name(proposer[len("draft: "):])
    return f"{name(run['model'])}: {proposer}"


def table(runs: list) -> str:
    lines = ["| target: method | prompt | K | acceptance | tokens / step | step cost | plain tok/s | tok/s | "
             "speed-up | break-even acceptance |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: |"]
    for r in runs:
        K, c = r["speculate_k"], r["step_cost"]
        lines.append(f"| {describe(r)} | {r['prompt']} ({r['prompt_tokens']} tokens) | {K} | "
                     f"{r['acceptance_rate']:.0%} | {1 + r['mean_accepted']:.2f} | {c:.2f} | "
                     f"{r['plain_tokens_per_sec']:.1f} | {r['speculative_tokens_per_sec']:.1f} | "
                     f"**{r['speedup']:.2f}x** | {(c - 1) / K:.0%} |")
    return "\n".join(lines)


def plot(runs: list, out: Path, title: str):
    """One panel per method: each run a point, its expectation (1 + K r) / c a solid line in its colour, the
    free-proposal ideal 1 + K r dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({method(r) for r in runs})
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 5), sharey=True, squeeze=False)
    rates, top = [i / 100 for i in range(101)], max(3.0, max(r["speedup"] for r in runs) * 1.2)
    for ax, m in zip(axes[0], methods):
        for i, r in enumerate(r for r in runs if method(r) == m):
            K, c, color = r["speculate_k"], r["step_cost"], f"C{i % 10}"
            ax.plot(rates, [(1 + K * x) / c for x in rates], color=color, lw=1, alpha=0.7)
            ax.plot(rates, [1 + K * x for x in rates], color=color, lw=0.8, ls=":", alpha=0.5)
            ax.scatter([r["acceptance_rate"]], [r["speedup"]], color=color, s=50, zorder=3,
                       label=f"{describe(r)}, {r['prompt_tokens']}-token prompt")
        ax.axhline(1, color="gray", lw=0.8, ls="--")
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("acceptance rate (accepted / proposed tokens per step)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, top)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("speed-up over plain decoding (measured)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def run(args) -> int:
    check_output_path(args.out, "--out", force=args.force)
    runs = load_runs(args.metrics)
    print(table(runs))
    plot(runs, args.out, args.title)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", type=Path, help="scripts/bench.py --metrics_json files")
    p.add_argument("--out", type=Path, default=Path("speculation.png"))
    p.add_argument("--title", default="Speculative decoding: measured speed-up (points) and its cost model (lines)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    cli_main(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
