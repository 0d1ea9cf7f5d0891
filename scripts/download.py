"""Download the files of a Hugging Face Llama-family model that scripts/convert_hf_checkpoint.py needs.

    python scripts/download.py --repo_id meta-llama/Llama-3.2-1B [--hf_token TOKEN] [--checkpoint_dir checkpoints]

Files go to <checkpoint_dir>/<repo_id>. Gated models (all of meta-llama) need their license accepted on the model
page and a token, from --hf_token or the HF_TOKEN environment variable.
"""
import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_fast.cli import check_output_folder, cli_main  # noqa: E402

EXTRAS = ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
          "tokenizer.model", "original/tokenizer.model"]  # Llama-3 ships its tiktoken file only under original/
# HF's own weight names (model.safetensors, model-00001-of-00004.safetensors, pytorch_model*.bin). Anything else is
# a duplicate or not ours: consolidated*.safetensors (Mistral's original format), training_args.bin, adapters.
WEIGHT_FORMATS = [("model.safetensors.index.json", re.compile(r"model(-\d+-of-\d+)?\.safetensors")),
                  ("pytorch_model.bin.index.json", re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin"))]


def select_files(repo_files: list) -> list:
    """The files to download: config, tokenizer and one copy of the weights, safetensors if the repo has them,
    otherwise .bin. Never original/consolidated*.pth or other duplicates. Empty weights means none usable.
    tokenizer.json only when there is no tokenizer.model (Qwen): it is the same tokenizer, several MB larger."""
    files = set(repo_files)
    extras = [f for f in EXTRAS if f in files]
    if any(f.endswith("tokenizer.model") for f in extras):
        extras = [f for f in extras if f != "tokenizer.json"]
    for index, pattern in WEIGHT_FORMATS:
        weights = sorted(f for f in files if pattern.fullmatch(f))
        if weights:
            return extras + ([index] if index in files else []) + weights
    return extras


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def hub_error(e: Exception, repo_id: str, token) -> str:
    """One line that says what went wrong and how to fix it."""
    from huggingface_hub import errors

    page = f"https://huggingface.co/{repo_id}"
    if isinstance(e, errors.GatedRepoError):
        if token:
            return f"{repo_id} is gated and this token has no access yet: accept the license on {page} with the " \
                   "token's account and wait for approval"
        return f"{repo_id} is gated: accept the license on {page}, then pass --hf_token or set HF_TOKEN " \
               "(create one at https://huggingface.co/settings/tokens)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"{repo_id} not found on the Hub: check the name; a private repo needs --hf_token or HF_TOKEN"
    if isinstance(e, errors.HFValidationError):
        return f"invalid repo id {repo_id!r}: expected owner/name, e.g. meta-llama/Llama-3.2-1B"
    if isinstance(e, errors.OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded: unset it"
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return "the Hub rejected the token (401): check --hf_token or HF_TOKEN"
        return f"the Hub refused the download: {first_line(e)}"
    # The OS's own errors (disk full, permissions); libraries' network errors subclass OSError too (requests,
    # huggingface_hub's LocalEntryNotFoundError for a lost connection) but are not builtins.
    if isinstance(e, OSError) and type(e).__module__ == "builtins" and not isinstance(e, ConnectionError):
        return f"cannot write the files: {e}"
    return f"cannot reach huggingface.co ({type(e).__name__}: {first_line(e)}): check the network or proxy settings"


class DownloadError(ValueError):
    """A Hub or network failure, said in one line (cli_main prints it as the error)."""


def download(repo_id: str, checkpoint_dir: Path, token=None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        repo_files = HfApi().list_repo_files(repo_id, token=token)
    except Exception as e:  # only Hub and network failures can come from here
        raise DownloadError(hub_error(e, repo_id, token)) from None
    files = select_files(repo_files)
    if "config.json" not in files:
        raise DownloadError(f"{repo_id} has no config.json: not a transformers model repo")
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise DownloadError(f"{repo_id} has no model*.safetensors or pytorch_model*.bin weights (GGUF, ONNX and "
                            "original-format-only repos are not supported)")
    if not any(f.endswith(("tokenizer.model", "tokenizer.json")) for f in files):
        print(f"warning: {repo_id} has no tokenizer.model or tokenizer.json; generate.py will need --tokenizer_path",
              file=sys.stderr)
    local_dir = checkpoint_dir / repo_id
    try:  # snapshot_download writes each file under a temporary name and renames it when complete
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=files, token=token)
    except Exception as e:
        raise DownloadError(hub_error(e, repo_id, token)) from None
    return local_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-3.2-1B")
    parser.add_argument("--hf_token", default=os.environ.get("HF_TOKEN"), help="default: $HF_TOKEN")
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"))
    cli_main(run, parser.parse_args(argv))


def run(args) -> int:
    check_output_folder(args.checkpoint_dir, "--checkpoint_dir")  # before the network; an interrupted download
    local_dir = download(args.repo_id, args.checkpoint_dir, args.hf_token or None)  # resumes when rerun
    print(f"downloaded {args.repo_id} to {local_dir}")
    return 0


if __name__ == "__main__":
    main()
