#!/usr/bin/env bash
# Download a Hugging Face Llama-family model and convert it for generate.py:
#   ./scripts/prepare.sh meta-llama/Llama-3.2-1B
# Gated models (all of meta-llama) need their license accepted on the model page and HF_TOKEN set.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 <hf-repo-id>   e.g. HF_TOKEN=hf_... $0 meta-llama/Llama-3.2-1B" >&2
    exit 2
fi
repo_id=$1

# checkpoints/ lives in the repository root, wherever this is run from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}

"$python" scripts/download.py --repo_id "$repo_id"
"$python" scripts/convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$repo_id"
echo "ready: cd $PWD && $python generate.py --checkpoint_path checkpoints/$repo_id/model.pth --prompt \"Hello\""
