"""What verifying a checkpoint on load costs (llama_fast/integrity.py's check_integrity: the zip's CRCs and no NaN
or infinite weight). One process, the page cache warm, the three kinds of load alternating round by round:

    off     the checks skipped: the baseline
    first   a file version never verified before: the checks run
    again   a file verified before (its inode, size, mtime and ctime remembered): nothing runs

each timed alone (load_model) and up to the first token (load, then a 16-token prompt's first generated token),
medians of --rounds.

    python scripts/bench_load.py --checkpoint_path checkpoints/<repo>/model.pth --rounds 5
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_fast.cli import PRECISIONS, cli_main  # noqa: E402  (first: it sets up torch's threads)

import torch  # noqa: E402

from decoding import generate  # noqa: E402
from llama_fast import checkpoint, integrity  # noqa: E402
from sampling import SamplingConfig  # noqa: E402

KINDS = ("off", "first", "again")


def one_load(path: Path, kind: str, precision) -> tuple[float, float]:
    """(seconds to load, seconds to load and generate the first token)."""
    verify = checkpoint.check_integrity
    if kind == "off":
        checkpoint.check_integrity = lambda *args: None
    elif kind == "first":
        integrity.verified_path().unlink(missing_ok=True)
    try:
        t0 = time.perf_counter()
        model = checkpoint.load_model(path, "cpu", precision)
        loaded = time.perf_counter() - t0
        generate(model, [list(range(1, 17))], 1, SamplingConfig(temperature=0))
        return loaded, time.perf_counter() - t0
    finally:
        checkpoint.check_integrity = verify


def run(args) -> int:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # our own table of verified files, not the user's
    one_load(args.checkpoint_path, "first", PRECISIONS[args.precision])  # pages into the cache; the table written
    times = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            times[kind].append(one_load(args.checkpoint_path, kind, PRECISIONS[args.precision]))
    size = args.checkpoint_path.stat().st_size / 1e9
    print(f"{args.checkpoint_path} ({size:.2f} GB, {args.precision}), medians of {args.rounds} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("| load | load (s) | vs off | load + first token (s) | vs off |\n| --- | ---: | ---: | ---: | ---: |")
    base = [statistics.median(t[i] for t in times["off"]) for i in (0, 1)]
    for kind in KINDS:
        load, first = (statistics.median(t[i] for t in times[kind]) for i in (0, 1))
        print(f"| {kind} | {load:.3f} | {load / base[0]:.2f} | {first:.3f} | {first / base[1]:.2f} |")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, required=True)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    cli_main(run, args)


if __name__ == "__main__":
    main()
