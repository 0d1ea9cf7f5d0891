#!/usr/bin/env bash
# Download a Hugging Face Llama-family model and convert it for generate.py:
#   ./scripts/prepare.sh meta-llama/Llama-3.2-1B [--force]
# --force converts again over an existing model.pth / model_config.json (otherwise refused).
# Gated models (all of meta-llama) need their license accepted on the model page and HF_TOKEN set.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ] || { [ $# -eq 2 ] && [ "$2" != --force ]; }; then
    echo "usage: $0 <hf-repo-id> [--force]   e.g. HF_TOKEN=hf_... $0 meta-llama/Llama-3.2-1B" >&2
    exit 2
fi
repo_id=$1
force=${2:-}

# checkpoints/ lives in the repository root, wherever this is run from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}

"$python" scripts/download.py --repo_id "$repo_id"
"$python" scripts/convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$repo_id" $force
echo "ready: cd $PWD && $python generate.py --checkpoint_path checkpoints/$repo_id/model.pth --prompt \"Hello\""
