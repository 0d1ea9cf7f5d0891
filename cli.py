"""What the command-line entry points share: the flags that name a model, device and precision, and how a run
ends (a user mistake exits with one "error: ..." line, never a traceback).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

import tp
from cpu_kernels import KERNELS
from tokenizer import TokenizerError

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CHECKPOINT = Path("checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def add_model_args(p: argparse.ArgumentParser):
    """--checkpoint_path, --tokenizer_path, --device, --precision and --cpu_kernels, with the same meaning in every command."""
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--tokenizer_path", type=Path, help="default: tokenizer.model beside the checkpoint")
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16")
    p.add_argument("--cpu_kernels", choices=["auto", *KERNELS], default="auto",
                   help="CPU matmul for float weights: auto = the fastest on this machine, measured once and cached")


def check_device(device: str):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")


def check_output_path(path: Path | None, what: str, force: bool = True):
    """Before any work: an output file's folder exists and is writable, the path is not a folder, and without
    `force` no file is there yet (nothing a user owns is replaced unasked). `what` names it in the error (the
    flag, or "output"). None (no output asked for) passes."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{what} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: folder {path.parent} is not writable")
    if path.exists() and not force:
        raise ValueError(f"{what} {path} exists; pass --force to replace it")


def cli_main(run, args):
    """Exit with run(args)'s code; a user mistake (a ValueError, FileNotFoundError or TokenizerError) exits with one
    "error: ..." line instead of a traceback. Under torchrun only rank 0 prints; errors are reported by every rank,
    and the process group is torn down however the run ends."""
    try:
        with tp.rank0_output():
            code = run(args)
        sys.exit(code)
    except (FileNotFoundError, ValueError, TokenizerError) as e:  # user mistakes: one line, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        tp.destroy_dist()
