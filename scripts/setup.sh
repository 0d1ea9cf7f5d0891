#!/usr/bin/env bash
# Installs what the project needs on a fresh machine. Keeps an existing torch (e.g. a CUDA build);
# otherwise installs the pinned CPU build, as a looser requirement would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -r requirements.txt
