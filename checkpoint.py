"""Checkpoint files: reading a state dict (one set of rules for every reader), building the model a checkpoint
describes, the tokenizer beside it, and writing files so that a crash never leaves a half-written one.

    model = load_model("checkpoints/<repo>/model.pth", "cuda", torch.bfloat16)

A checkpoint is model.pth (or .safetensors) with model_config.json (ModelArgs) beside it; quantize.py's files hold
{"quantization": {...}, "state_dict": {...}} and load with their quantized modules. No pickled code is executed:
torch.load runs with weights_only=True, or the file is safetensors.
"""
import json
import os
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import tp
from model import CONFIG_NAME, ModelArgs, Transformer
from qlinear import pack_for_device, swap_in_quantized

TOKENIZER_NAME = "tokenizer.model"  # beside the checkpoint unless a path is given


def read_state_dict(path) -> dict:
    """The tensors of a .safetensors file or a torch.save file (memory-mapped when it is in the zip format, so a
    large checkpoint is not read into memory at once; older non-zip files are read whole). A file that is not a
    state dict raises a one-line ValueError."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint at all: say so in one line
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"cannot read checkpoint {path}: not a state dict")
    return state


def read_config(checkpoint_path: Path) -> ModelArgs:
    config_path = checkpoint_path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: convert the model with scripts/convert_hf_checkpoint.py")
    try:
        return ModelArgs.load(config_path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid {config_path}: {e}") from None


def load_model(checkpoint_path, device="cpu", precision=torch.bfloat16, tensor_parallel=False,
               cpu_kernels: str = "auto") -> Transformer:
    """Build the model described by model_config.json beside the checkpoint and load its weights. Quantized
    checkpoints from quantize.py get their quantized modules, packed for the device, and keep their metadata in
    model.quantization. precision=None keeps stored dtypes. tensor_parallel=True keeps only this rank's shard
    (tp.apply_tp) of the process group that tp.maybe_init_dist set up. On CPU the float linears use the matmul
    kernel that is fastest on this machine (cpu_kernels="auto", see cpu_kernels.py) or the one named; "addmv"
    keeps the weights as stored (e.g. to quantize them)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = read_config(path)
    state = read_state_dict(path)
    quantization = state.get("quantization") if isinstance(state.get("quantization"), dict) else None
    if quantization:
        state = state["state_dict"]
    with torch.device("meta"):
        model = Transformer(config)
    if quantization:
        swap_in_quantized(model, quantization["layers"], quantization.get("groupsize") or 0)
    assign_weights(model, state, path)
    if tensor_parallel:  # before the move to the device and the int4 packing: a rank never holds the whole model
        try:
            tp.apply_tp(model)
        except ValueError as e:  # the model does not divide: say which one (a target or its draft)
            raise ValueError(f"{path}: {e}") from None
    model = model.to(device=device, dtype=precision).eval().requires_grad_(False)
    model.quantization = quantization
    if quantization:
        pack_for_device(model)
    if tensor_parallel:  # the replicated layers must compute alike on every rank: rank 0 measures, all use its choice
        cpu_kernels = tp.from_rank0(model.use_cpu_kernels(cpu_kernels) if tp.rank() == 0 else None)
    model.use_cpu_kernels(cpu_kernels)
    return model


def assign_weights(model: Transformer, state: dict, path: Path):
    """Load `state` into the meta-device model (assign=True: the tensors are used as they are, no copy)."""
    tied = model.config.tie_embeddings and isinstance(model.output, torch.nn.Linear)  # a quantized output is a copy
    if tied:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match {path.parent / CONFIG_NAME}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight


def tokenizer_file(checkpoint_path, given=None) -> Path:
    """The tokenizer to use with a checkpoint: `given`, else tokenizer.model beside the checkpoint."""
    return Path(given) if given else Path(checkpoint_path).parent / TOKENIZER_NAME


def check_vocab(tokenizer, model: Transformer):
    """A tokenizer whose ids run past the model's embedding table belongs to another model."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}:"
                         " wrong --tokenizer_path?")


def atomic_save(obj, path: Path, save=torch.save):
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written file there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj):
    atomic_save(obj, path, save=lambda o, p: Path(p).write_text(json.dumps(o, indent=2) + "\n"))
