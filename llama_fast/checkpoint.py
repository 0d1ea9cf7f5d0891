"""Checkpoint files: reading a state dict (one set of rules for every reader, verified by integrity.py), building
the model a checkpoint describes, and the tokenizer beside it.

    model = load_model("checkpoints/<repo>/model.pth", "cuda", torch.bfloat16)

A checkpoint is model.pth (or .safetensors) with model_config.json (ModelArgs) beside it; quantize.py's files hold
{"quantization": {...}, "state_dict": {...}} and load with their quantized modules. No pickled code is executed:
torch.load runs with weights_only=True, or the file is safetensors.
"""
import pickle
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from llama_fast.cpu.choice import choose_kernels, use_cpu_kernels
from llama_fast.cpu.toolchain import openmp_warning, say_once
from llama_fast.cpu.tune import tuned_kernels
from llama_fast.integrity import check_integrity
from llama_fast.quant.qlinear import GROUP_SIZES, pack_for_device, swap_in_quantized
from model import Transformer
from model_config import CONFIG_NAME, ModelArgs
import tp

TOKENIZER_NAME = "tokenizer.model"  # beside the checkpoint unless a path is given
HF_TOKENIZER_NAME = "tokenizer.json"  # used when there is no tokenizer.model


def read_state_dict(path, verify: bool = True) -> dict:
    """The tensors of a .safetensors file or a torch.save file (memory-mapped when it is in the zip format, so a
    large checkpoint is not read into memory at once; older non-zip files are read whole), verified
    (check_integrity) unless the caller does it itself. A file that is not a state dict raises a one-line
    ValueError that says what the file is."""
    path = Path(path)
    check_is_file(path, "checkpoint")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # a damaged file starting with byte 0x80 reads as an odd pickle protocol
                warnings.filterwarnings("ignore", message="Detected pickle protocol")  # we say what it is instead
                state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        if not found:  # not a pickle of ours at all: random bytes, a damaged file
            raise ValueError(f"cannot read checkpoint {path}: {file_kind(path)}") from None
        # weights_only refused a Python object: say which, and that nothing ran
        raise ValueError(f"refused to load checkpoint {path}: it holds Python objects, not only tensors "
                         f"({found[:160]}); no pickled code is run (weights_only=True)") from None
    except Exception as e:  # truncated, corrupt or not a checkpoint at all: say so in one line
        raise ValueError(f"cannot read checkpoint {path}: {file_kind(path) or str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"cannot read checkpoint {path}: not a state dict but a {type(state).__name__}")
    if verify:
        check_integrity(path, state)
    return state


def check_is_file(path: Path, what: str):
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give the file inside it (e.g. {path / 'model.pth'})")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): an interrupted download or copy?")


def file_kind(path: Path) -> str:
    """Why a file that torch.load or safetensors could not read is not a checkpoint, in words ("" if unknown)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive without its end: truncated (an interrupted download or copy?)"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] <= 5:
        return "a pickle that is truncated or damaged"
    if path.suffix == ".safetensors":
        return "not a valid safetensors file (truncated or damaged?)"
    return f"not a PyTorch or safetensors checkpoint (it starts with bytes {head.hex(' ')})"


def read_config(checkpoint_path: Path) -> ModelArgs:
    config_path = checkpoint_path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: convert the model with scripts/convert_hf_checkpoint.py")
    try:
        return ModelArgs.load(config_path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid {config_path}: {e}") from None


def load_model(checkpoint_path, device="cpu", precision=torch.bfloat16, tensor_parallel=False,
               cpu_kernels: str = "auto", compiled: bool = False, cpu_gemm: str = "auto") -> Transformer:
    """Build the model described by model_config.json beside the checkpoint and load its weights. Quantized
    checkpoints from quantize.py get their quantized modules, packed for the device, and keep their metadata in
    model.quantization. precision=None keeps stored dtypes. tensor_parallel=True keeps only this rank's shard
    (tp.apply_tp) of the process group that tp.maybe_init_dist set up. On CPU the layers get the kernels of
    llama_fast.cpu (cpu_kernels="auto": the rule for this CPU, nothing timed; "tune": measured here once, cached;
    a kernel's name; "none": plain nn.Linear layers, the weights as stored, e.g. to quantize them). compiled=True:
    the one-token steps will be compiled (generate.py --compile), where inductor's generated loops may apply (not
    under tensor parallelism, where every rank takes rank 0's eager choice). cpu_gemm: how a 16-bit model's
    several-token matmuls run on CPU: "auto", "native" or "float32"."""
    path = Path(checkpoint_path)
    check_is_file(path, "checkpoint")
    config = read_config(path)
    state = read_state_dict(path, verify=False)
    with ThreadPoolExecutor(1) as pool:  # verified while the model is built; refused before it is returned
        verified = pool.submit(check_integrity, path, state)
        try:
            return build_model(path, config, state, device, precision, tensor_parallel, cpu_kernels, compiled,
                               cpu_gemm)
        finally:
            verified.result()  # a damaged file's error first: it explains any other


def build_model(path: Path, config: ModelArgs, state: dict, device, precision, tensor_parallel: bool,
                cpu_kernels: str, compiled: bool, cpu_gemm: str) -> Transformer:
    """load_model's work once the weights are read: the model built around them, placed and given its kernels."""
    quantization = state.get("quantization") if isinstance(state.get("quantization"), dict) else None
    if quantization:
        check_quantization(state, path)
        state = state["state_dict"]
    with torch.device("meta"):
        model = Transformer(config)
    if quantization:
        swap_in_quantized(model, quantization["layers"], quantization.get("groupsize") or 0)
    assign_weights(model, state, path)
    from_file = storages(model)
    if tensor_parallel:  # before the move to the device and the int4 packing: a rank never holds the whole model
        try:
            tp.apply_tp(model)
        except ValueError as e:  # the model does not divide: say which one (a target or its draft)
            raise ValueError(f"{path}: {e}") from None
    model = model.to(device=device, dtype=precision).eval().requires_grad_(False)
    model.quantization = quantization
    if quantization:
        pack_for_device(model)
    if cpu_kernels != "none":
        give_cpu_kernels(model, cpu_kernels, compiled and not tensor_parallel, cpu_gemm, tensor_parallel)
    release_file(model, from_file)
    return model


def give_cpu_kernels(model: Transformer, kernels: str, compiled: bool, gemm: str, tensor_parallel: bool):
    """llama_fast.cpu's kernels swapped in; under tensor parallelism every rank uses rank 0's choice, so that the
    replicated layers compute alike."""
    choice = cpu_kernels_for(model, kernels, gemm, compiled) if not tensor_parallel or tp.rank() == 0 else None
    if compiled and model.tok_embeddings.weight.device.type == "cpu" and (warning := openmp_warning()):
        say_once(warning)
    use_cpu_kernels(model, tp.from_rank0(choice) if tensor_parallel else choice)


def cpu_kernels_for(model: Transformer, kernels: str = "auto", gemm: str = "auto", compiled: bool = False):
    """The CpuKernels that --cpu_kernels and --cpu_gemm ask for: "tune" measures (llama_fast.cpu.tune: seconds to
    minutes the first time on a machine, then read from its cache); anything else is decided without timing."""
    tuned = tuned_kernels(model, compiled) if kernels == "tune" else None
    return choose_kernels(model, "auto" if kernels == "tune" else kernels, gemm, compiled, tuned)


def cpu_tensors(model: Transformer) -> list:
    """The model's parameters and buffers in plain CPU memory (not oneDNN's opaque prepacked tensors)."""
    return [t for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu" and not t.is_mkldnn]


def storages(model: Transformer) -> set:
    """The CPU storages the model's tensors live in (their start addresses)."""
    return {t.untyped_storage().data_ptr() for t in cpu_tensors(model)}


def release_file(model: Transformer, from_file: set):
    """Once some weights were converted on load (prepacked for oneDNN, int4-packed, cast, moved), let the
    memory-mapped checkpoint go: the tensors still pointing into it (from_file: the storages loading assigned)
    keep the whole mapping alive, and with it every page of the file that loading read, so a prepacked model would
    stay resident twice (tinyllama bf16: 4.4 GB instead of 2.3). Those tensors get their own memory instead."""
    still = [t for t in cpu_tensors(model) if t.untyped_storage().data_ptr() in from_file]
    if len({t.untyped_storage().data_ptr() for t in still}) < len(from_file):  # some were converted
        for t in still:
            t.data = t.data.clone()


def device_bytes(paths: list, device: str) -> int:
    """What loading these checkpoints adds to the device's memory use, for checks made before they load: their size
    on a GPU (copied there); 0 on the CPU, where they are memory-mapped and their pages are the page cache's, which
    the free memory (MemAvailable) already counts as reclaimable."""
    return sum(Path(p).stat().st_size for p in paths if p) if torch.device(device).type == "cuda" else 0


def check_quantization(saved: dict, path: Path):
    """A quantize.py file has a state dict and metadata naming each layer's format (and int4's group size)."""
    meta, why = saved["quantization"], ""
    if not isinstance(saved.get("state_dict"), dict):
        why = "no state_dict"
    elif not isinstance(meta.get("layers"), dict):
        why = "its quantization metadata has no 'layers' table"
    elif "int4" in meta["layers"].values() and meta.get("groupsize") not in GROUP_SIZES:
        why = f"int4 layers with groupsize {meta.get('groupsize')!r} (one of {', '.join(map(str, GROUP_SIZES))})"
    if why:
        raise ValueError(f"cannot read quantized checkpoint {path}: {why}; write it again with quantize.py")


def assign_weights(model: Transformer, state: dict, path: Path):
    """Load `state` into the meta-device model (assign=True: the tensors are used as they are, no copy)."""
    tied = model.config.tie_embeddings and isinstance(model.output, torch.nn.Linear)  # a quantized output is a copy
    if any(name.startswith(("model.layers.", "model.embed_tokens.")) for name in state):
        raise ValueError(f"{path} holds a Hugging Face model's tensors, not converted ones: convert it first with "
                         f"scripts/convert_hf_checkpoint.py --checkpoint_dir {path.parent}")
    if tied:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    check_shapes(state, model, path.parent / CONFIG_NAME)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # missing or unexpected tensors
        raise ValueError(f"checkpoint {path} does not match {path.parent / CONFIG_NAME}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight


def check_shapes(state: dict, model: Transformer, config_path: Path):
    """Every tensor has the shape the config implies: a config field that disagrees with the weights, named by
    the first tensor it puts out of shape."""
    expected = model.state_dict()
    for name, t in state.items():
        if name in expected and t.shape != expected[name].shape:
            raise ValueError(f"weights do not match {config_path}: {name} is {tuple(t.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")


def tokenizer_file(checkpoint_path, given=None) -> Path:
    """The tokenizer to use with a checkpoint: `given`, else tokenizer.model beside the checkpoint, else the
    tokenizer.json there (Qwen and other repos without a tokenizer.model)."""
    if given:
        return Path(given)
    folder = Path(checkpoint_path).parent
    if not (folder / TOKENIZER_NAME).exists() and (folder / HF_TOKENIZER_NAME).exists():
        return folder / HF_TOKENIZER_NAME
    return folder / TOKENIZER_NAME


# what a loader reads beside a checkpoint or a tokenizer; an output written over any of them breaks the next load
READ_BESIDE = (CONFIG_NAME, TOKENIZER_NAME, HF_TOKENIZER_NAME, "tokenizer_config.json", "generation_config.json")


def files_read(checkpoint_path, tokenizer_path=None, what: str = "the checkpoint") -> dict:
    """{what it is: path} for every file that loading this checkpoint reads: the weights, the tokenizer, and the
    config and tokenizer files beside each (those that exist are compared; the rest cost nothing)."""
    checkpoint_path = Path(checkpoint_path)
    tokenizer = tokenizer_file(checkpoint_path, tokenizer_path)
    files = {what: checkpoint_path, f"the tokenizer of {what}": tokenizer}
    for folder in dict.fromkeys((checkpoint_path.parent, tokenizer.parent)):
        files |= {f"{name} beside {what}": folder / name for name in READ_BESIDE if folder / name != tokenizer}
    return files


def check_vocab(tokenizer, model: Transformer | ModelArgs):
    """The rule: the tokenizer has exactly the model's vocabulary, or fewer tokens where model_config.json says the
    embedding is padded (vocab_padded: Qwen's). A tokenizer with more ids than the model's embedding table belongs
    to another model; with fewer, the model can produce ids that decode to nothing. `model` may be its ModelArgs:
    checked before the weights load."""
    config = model if isinstance(model, ModelArgs) else model.config
    n, rows = tokenizer.vocab_size, config.vocab_size
    if n > rows:
        raise ValueError(f"tokenizer has {n} tokens but the model only {rows}: wrong --tokenizer_path?")
    if n < rows and not config.vocab_padded:
        raise ValueError(f"tokenizer has {n} tokens but the model {rows}: ids past {n - 1} would decode to nothing "
                         "(wrong --tokenizer_path? if the embedding is padded, set vocab_padded in model_config.json)")
