#!/usr/bin/env bash
# Quick start on a fresh machine, no download: a random-weight stories110M-shaped model and a tokenizer built
# from this repo's text are converted like a real checkpoint, then generated from with --compile.
# The text is gibberish (random weights); the speed is real.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-stories110M}
DIR=checkpoints/demo-$MODEL
bash scripts/setup.sh
python3 scripts/make_demo_checkpoint.py --model "$MODEL" --out "$DIR"
python3 scripts/convert_hf_checkpoint.py --checkpoint_dir "$DIR"
echo "== generate.py --compile (RANDOM WEIGHTS: the text is meaningless, the speed is real)"
python3 generate.py --compile --checkpoint_path "$DIR/model.pth" --prompt "Once upon a time" \
  --max_new_tokens 128 --num_samples 3 --ignore_eos
