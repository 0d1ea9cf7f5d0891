#!/usr/bin/env bash
# Quick start on a fresh machine, no download: a random-weight stories110M-shaped model and a tokenizer built
# from this repo's text are converted like a real checkpoint, generated from with --compile, then quantized
# to int4 and generated from again.
# The text is gibberish (random weights); the speed is real.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-stories110M}
DIR=checkpoints/demo-$MODEL
bash scripts/setup.sh
python3 scripts/make_demo_checkpoint.py --model "$MODEL" --out "$DIR"
python3 scripts/convert_hf_checkpoint.py --checkpoint_dir "$DIR" --force
echo "== generate.py --compile (RANDOM WEIGHTS: the text is meaningless, the speed is real)"
python3 generate.py --compile --checkpoint_path "$DIR/model.pth" --prompt "Once upon a time" \
  --max_new_tokens 128 --num_samples 3 --ignore_eos
echo "== quantize.py --mode int4, then generate.py --compile on the int4 checkpoint (RANDOM WEIGHTS)"
python3 quantize.py --checkpoint_path "$DIR/model.pth" --mode int4 --groupsize 32 --force
python3 generate.py --compile --checkpoint_path "$DIR/model_int4.g32.pth" --prompt "Once upon a time" \
  --max_new_tokens 128 --num_samples 3 --ignore_eos
