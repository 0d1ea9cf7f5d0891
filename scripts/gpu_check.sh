#!/usr/bin/env bash
# One-command check on a machine with a CUDA GPU, about 10 minutes at most: the device-aware tests (pytest marker
# `device`) with --device cuda, the one-token linear rates (scripts/bench_cuda_linear.py), then Llama-2-7B-shaped
# decode benchmarks (random weights, --compile): bfloat16, int8, lookahead decoding and its step-cost table, int4
# g128, speculative decoding with an int4 g128 draft.
# Commands, their output, the GPU, the torch version and the date are appended to one results file.
#
#     bash scripts/gpu_check.sh [RESULTS_FILE]          # default: gpu_check_results.txt
#
# Time limits in seconds, from the environment: TEST_TIMEOUT (default 300), BENCH_TIMEOUT (180 per benchmark) and
# TOTAL_TIMEOUT (570 for the whole script: each step gets at most what is left; one with under 30 s is skipped);
# TEST_WORKERS (6) pytest-xdist workers where it is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_results.txt}
PY=${PYTHON:-python3}
END=$(( $(date +%s) + ${TOTAL_TIMEOUT:-570} ))
METRICS=$(mktemp -d)
FAILED=0

if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "error: no CUDA device is present ($PY -c 'import torch; assert torch.cuda.is_available()' failed)"
  exit 1
fi

step() {  # step LIMIT COMMAND...: run COMMAND under timeout, its output shown and appended to $OUT
  local limit=$1 left=$(( END - $(date +%s) )) start rc
  shift
  (( left < limit )) && limit=$left
  printf '\n$ %s\n' "$*" | tee -a "$OUT"
  if (( limit < 30 )); then
    echo "[skipped: out of time]" | tee -a "$OUT"
    FAILED=$(( FAILED + 1 ))
    return
  fi
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT"
  rc=${PIPESTATUS[0]}
  echo "[exit $rc$( (( rc == 124 || rc == 137 )) && echo ": timed out after ${limit}s"), $(( $(date +%s) - start ))s]" \
    | tee -a "$OUT"
  (( rc == 0 )) || FAILED=$(( FAILED + 1 ))
}

bench() {  # bench NAME ARGS...: scripts/bench.py on the llama-2-7b preset, its metrics JSON appended to $OUT
  step "${BENCH_TIMEOUT:-180}" "$PY" scripts/bench.py --model llama-2-7b --compile --device cuda --num_samples 3 \
    --metrics_json "$METRICS/$1.json" "${@:2}"
  [[ -f $METRICS/$1.json ]] && { echo "metrics ($1):"; cat "$METRICS/$1.json"; } >> "$OUT"
}

{
  echo "=== gpu_check, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  nvidia-smi -L
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$OUT"

IGNORE=()
if ! "$PY" -c "import lm_eval, lm_eval.evaluator" 2>/dev/null; then
  # A machine that reaches PyPI can install it (bash scripts/setup.sh keeps the CUDA torch); a lent GPU machine
  # without network needs its wheels carried in. Without it the other device tests still run.
  echo "note: lm_eval is not installed here: tests/test_eval.py is left out" | tee -a "$OUT"
  IGNORE=(--ignore tests/test_eval.py)
fi
if ! "$PY" -c "import fastapi, uvicorn, openai, httpx, prometheus_client" 2>/dev/null; then
  # tests/test_serve.py runs on CPU whatever --device says; the engine's device tests are in tests/test_engine.py
  echo "note: the serving packages are not installed here: tests/test_serve.py is left out" | tee -a "$OUT"
  IGNORE+=(--ignore tests/test_serve.py)
fi
# Every failure is listed (no -x): a device run is rare and short. pytest-xdist and pytest-timeout, where installed
# (the lent machine has both), spread the tests over worker processes and stop a hung test rather than the step.
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n "${TEST_WORKERS:-6}")
"$PY" -c "import pytest_timeout" 2>/dev/null && PARALLEL+=(--timeout 150)
step "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q tests --device cuda -m device -rfE "${PARALLEL[@]}" "${IGNORE[@]}"
step 90 "$PY" scripts/bench_cuda_linear.py   # the one-token int8/bf16 linear rates behind decoding.compile_static
# What was never measured on a GPU first (BENCHMARKS.md, GPU: the 2026-12-04 run ran out of time at lookahead)
bench bf16
bench int8 --quantize int8
bench lookahead --lookahead   # the CUDA defaults (W=15, N=5, G=15)
step "${BENCH_TIMEOUT:-180}" "$PY" scripts/bench_lookahead_cost.py --model llama-2-7b --device cuda \
  --configs 4,3,2 7,4,5 10,5,10 15,5,15 20,6,20
bench int4 --quantize int4 --groupsize 128
bench speculative_int4_draft --draft int4 --groupsize 128

echo "=== gpu_check done, $(date -u '+%H:%M:%S UTC'): $FAILED step(s) failed or skipped" | tee -a "$OUT"
rm -rf "$METRICS"
(( FAILED == 0 ))
