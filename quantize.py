"""Weight-only quantization as module swaps: int8 (per output channel), int4 (groupwise), int4-GPTQ.

    python quantize.py --checkpoint_path checkpoints/<repo>/model.pth --mode int8
    python quantize.py --checkpoint_path checkpoints/<repo>/model.pth --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/<repo>/model.pth --mode int4-gptq --groupsize 32 \
        --calibration_file wikitext-2-raw/wiki.train.raw

The output (model_int8.pth, model_int4.g32.pth, model_int4-gptq.g32.pth beside the input) describes itself: it
holds {"quantization": {...}, "state_dict": {...}}, and stores int4 weights in a portable layout that is packed
for the device's kernel when loaded, so one file runs on CPU and CUDA.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MODES = ("int8", "int4", "int4-gptq")
GROUP_SIZES = (32, 64, 128, 256)


# ------------------------------------------------------------------------------------------------ the formats

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel: w ≈ q * scale[:, None], q in [-127, 127]."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_qparams(w: Tensor, groupsize: int) -> Tensor:
    """(N, K/g, 2) scale and zero per group: asymmetric min/max, zero in the float domain at code 8
    (w ≈ (q - 8) * scale + zero), the convention of PyTorch's int4 kernels."""
    groups = w.float().reshape(w.shape[0], -1, groupsize)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (hi - lo).clamp(min=1e-6) / 15
    return torch.stack([scales, lo + 8 * scales], dim=-1)


def quantize_int4(w: Tensor, qparams: Tensor, groupsize: int) -> Tensor:
    """Codes 0..15 (uint8, shape of w) for the given per-group (scale, zero)."""
    scales, zeros = qparams[..., 0].repeat_interleave(groupsize, 1), qparams[..., 1].repeat_interleave(groupsize, 1)
    return torch.round((w.float() - (zeros - 8 * scales)) / scales).clamp(0, 15).to(torch.uint8)


def dequantize_int4(q: Tensor, qparams: Tensor, groupsize: int) -> Tensor:
    scales, zeros = qparams[..., 0].repeat_interleave(groupsize, 1), qparams[..., 1].repeat_interleave(groupsize, 1)
    return (q.float() - 8) * scales + zeros


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) codes -> (N, K/2) bytes, even column in the high nibble: the input layout of
    aten._convert_weight_to_int4pack, and a plain, device-independent one to store."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1)


# ---------------------------------------------------------------------------------------- the quantized linears

class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))

    @torch.no_grad()
    def pack_for_device(self):
        # ATen's CPU kernel reads rows in aligned 16-element blocks (a segfault with in_features=172), and inductor
        # rewrites the generic path below into that kernel too: pad rows with zeros to a multiple of 32.
        if self.weight.device.type == "cpu" and self.in_features % 32:
            self.weight = F.pad(self.weight, (0, -self.in_features % 32))

    def forward(self, x: Tensor) -> Tensor:
        K = self.weight.shape[1]
        if x.device.type == "cpu" and K % 32 == 0:  # ATen's vectorised int8 x bfloat16 CPU kernel
            if K != self.in_features:
                x = F.pad(x, (0, K - self.in_features))
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, K), self.weight, self.scales.to(x.dtype))
            return y.view(*x.shape[:-1], -1)
        # On GPUs torch.compile fuses the int8 -> activation dtype conversion into the matmul's weight load.
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(nn.Module):
    """Groupwise int4. `weight` holds the portable packed codes (N, K/2) until pack_for_device() converts it to
    the layout of the device's kernel. K may be padded up to a multiple of the group size (padding columns are
    zero; the activation is padded to match)."""

    def __init__(self, in_features: int, out_features: int, groupsize: int):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in = -(-in_features // groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(self.padded_in // groupsize, out_features, 2))
        self.kernel = None  # "cpu" or "cuda" once packed

    @torch.no_grad()
    def pack_for_device(self):
        device = self.weight.device
        if device.type == "cpu":
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).int(), 1)
        elif device.type == "cuda":
            inner_k_tiles = 8 if self.padded_in % 128 == 0 else 4 if self.padded_in % 64 == 0 else 2
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)  # the CUDA kernel takes bf16 only
        else:
            raise ValueError(f"int4 weights need a CPU or CUDA device, not {device.type}")
        self.kernel = device.type

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        if self.kernel == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.groupsize,
                                                          self.scales_and_zeros.to(x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.weight, self.groupsize,
                                                   self.scales_and_zeros).to(x.dtype)
        return y.view(*shape[:-1], -1)


def linear_names(model: nn.Module, quantize_output: bool) -> list:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and (quantize_output or name != "output")]


def int4_skip_reason(layer: nn.Linear):
    if layer.out_features % 16:  # the CPU packing works on blocks of 16 output rows (CUDA on 8)
        return f"out_features {layer.out_features} is not a multiple of 16"
    return None


def swap_in_quantized(model: nn.Module, layers: dict, groupsize: int = 0):
    """Replace each named nn.Linear by its quantized module ("int8" or "int4"); others stay as they are."""
    for name, kind in layers.items():
        if kind not in ("int8", "int4"):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = Int8Linear(old.in_features, old.out_features) if kind == "int8" else \
            Int4Linear(old.in_features, old.out_features, groupsize)
        setattr(parent, child, new.to(old.weight.device) if old.weight.device.type != "meta" else new)
    return model


def pack_for_device(model: nn.Module):
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.pack_for_device()
    return model


# ------------------------------------------------------------------------------------------ quantizing a model

@torch.no_grad()
def quantize_linear(layer: nn.Linear, kind: str, groupsize: int, hessian: Tensor | None = None, **gptq_args) -> dict:
    """State dict entries of the quantized replacement of one nn.Linear."""
    w = layer.weight.detach().float()
    if kind == "int8":
        q, scales = quantize_int8(w)
        return {"weight": q, "scales": scales}
    pad = -w.shape[1] % groupsize
    w = F.pad(w, (0, pad))
    if hessian is not None:  # padding columns get zero rows in H: GPTQ treats them as dead inputs
        q, qparams = gptq_quantize(w, F.pad(hessian.float(), (0, pad, 0, pad)), groupsize, **gptq_args)
    else:
        qparams = int4_qparams(w, groupsize)
        q = quantize_int4(w, qparams, groupsize)
    return {"weight": pack_int4(q), "scales_and_zeros": qparams.transpose(0, 1).contiguous()}


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, groupsize: int = 128, quantize_output: bool = True,
                   progress: bool = True) -> tuple[dict, dict]:
    """Round-to-nearest int8 or int4 of every linear layer. Returns (state_dict, quantization metadata)."""
    from tqdm import tqdm
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantize_model does round-to-nearest int8 or int4, not {mode}: GPTQ is gptq_quantize_model")
    layers, state = {}, {}
    names = linear_names(model, quantize_output)
    for name in tqdm(names, desc=f"quantizing to {mode}", disable=not progress, file=sys.stderr):
        layer = model.get_submodule(name)
        reason = int4_skip_reason(layer) if mode == "int4" else None
        if reason:
            layers[name] = f"kept in {layer.weight.dtype}: {reason}"
            continue
        layers[name] = mode
        for key, t in quantize_linear(layer, mode, groupsize).items():
            state[f"{name}.{key}"] = t
    meta = {"mode": mode, "groupsize": groupsize if mode == "int4" else None, "quantize_output": quantize_output,
            "layers": layers}
    return add_unquantized(model, state, layers), meta


def add_unquantized(model: nn.Module, state: dict, layers: dict) -> dict:
    """The model's other tensors (embeddings, norms, linears kept in float) join the quantized ones."""
    for name, t in model.state_dict().items():
        if layers.get(name.rpartition(".")[0]) not in ("int8", "int4"):
            state.setdefault(name, t)
    return state


# ------------------------------------------------------------------------------------------------------- GPTQ

@torch.no_grad()
def gptq_quantize(w: Tensor, H: Tensor, groupsize: int, percdamp: float = 0.01, blocksize: int = 128):
    """GPTQ (Frantar et al. 2022) into the int4 format above. Quantizes the columns of w (N, K) in order, each
    time spreading the column's rounding error over the columns not yet quantized so as to minimise
    ‖XWᵀ − XŴᵀ‖ for the calibration inputs X summarised by H = 2XᵀX/n (K, K). No activation reordering: the
    groups stay the runtime's contiguous column groups. Returns codes (N, K) uint8 and qparams (N, K/g, 2)."""
    N, K = w.shape
    if K % groupsize:
        raise ValueError(f"{K} columns are not a multiple of the group size {groupsize}: pad them first")
    W, H = w.float().clone(), H.float().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: any weight does, so make it 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    # Row i of the upper Cholesky factor of H⁻¹ says how column i's error is best absorbed by the columns after it.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    qparams = torch.empty(N, K // groupsize, 2, device=W.device)
    for b0 in range(0, K, blocksize):
        b1 = min(b0 + blocksize, K)
        Wb, Hb = W[:, b0:b1], Hinv[b0:b1, b0:b1]  # Wb is a view: the updates inside the block land in W
        err = torch.zeros_like(Wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % groupsize == 0:  # group parameters from the weights as the errors so far have left them
                group = W[:, col:col + groupsize].clone()
                if col + groupsize > b1:  # its columns past this block still miss this block's lazy update
                    group[:, b1 - col:] -= err[:, :i] @ Hinv[b0:col, b1:col + groupsize]
                qparams[:, col // groupsize] = int4_qparams(group, groupsize)[:, 0]
            scale, zero = qparams[:, col // groupsize].unbind(-1)
            # the arithmetic of quantize_int4 and dequantize_int4, so these codes are what the runtime computes with
            q = torch.round((Wb[:, i] - (zero - 8 * scale)) / scale).clamp(0, 15)
            codes[:, col] = q.to(torch.uint8)
            err[:, i] = (Wb[:, i] - ((q - 8) * scale + zero)) / Hb[i, i]
            Wb[:, i:] -= err[:, i:i + 1] * Hb[i:i + 1, i:]
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]  # the lazy batch update of the columns after the block
    return codes, qparams


def run_block(block: nn.Module, xs: list, model: nn.Module):
    """Yields each calibration sequence (1, T, dim) through one TransformerBlock, without a KV cache."""
    for x in xs:
        yield block(x, *model.block_inputs(1, x.shape[1], x.device), None)


def collect_hessians(linears: dict, forward) -> dict:
    """H = 2XᵀX/n (float32) of the inputs X that each named linear sees while the `forward` iterator runs (forward
    hooks: the fused wqkv and w13 see the same input as their siblings would, so one hook per module is right)."""
    sums, rows = {}, {}

    def hook(name):
        def accumulate(module, args, output):
            x = args[0].reshape(-1, module.in_features).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        for _ in forward:
            pass
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * sums[name] / rows[name] for name in sums}


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, sequences: list, groupsize: int = 128, quantize_output: bool = True,
                        percdamp: float = 0.01, blocksize: int = 128, progress: bool = True) -> tuple[dict, dict]:
    """int4 GPTQ of every linear layer of a float32 Transformer, calibrated on `sequences` (lists of token ids)
    one block at a time, so only one depth's activations are held. Each quantized block's weights are replaced in
    the model by their dequantized values, so the next block calibrates on what the quantized model computes.
    Returns (state_dict, quantization metadata)."""
    from tqdm import tqdm
    layers, state = {}, {}

    def quantize_layers(linears: dict, hessians: dict, swap: bool):
        for name, layer in linears.items():
            reason = int4_skip_reason(layer)
            if reason:
                layers[name] = f"kept in {layer.weight.dtype}: {reason}"
                continue
            try:
                entries = quantize_linear(layer, "int4", groupsize, hessians[name], percdamp=percdamp,
                                          blocksize=blocksize)
            except torch.linalg.LinAlgError:
                raise ValueError(f"GPTQ of {name}: its Hessian is not positive definite; raise --percdamp") from None
            layers[name] = "int4"
            state.update({f"{name}.{key}": t for key, t in entries.items()})
            if swap:
                w = dequantize_int4(unpack_int4(entries["weight"]), entries["scales_and_zeros"].transpose(0, 1),
                                    groupsize)
                layer.weight.copy_(w[:, :layer.in_features])

    device = model.tok_embeddings.weight.device
    xs = [model.tok_embeddings(torch.tensor([s], device=device)) for s in sequences]
    bar = tqdm(total=len(model.layers) + quantize_output, desc=f"GPTQ int4 g{groupsize}", disable=not progress,
               file=sys.stderr)
    for i, block in enumerate(model.layers):
        linears = {f"layers.{i}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        quantize_layers(linears, collect_hessians(linears, run_block(block, xs, model)), swap=True)
        for j, y in enumerate(run_block(block, xs, model)):  # the next block's inputs, through this block
            xs[j] = y  # quantized, in place: one set of activations is held
        bar.update()
    if quantize_output:  # from the final norm's output; not swapped in: nothing comes after it (and it may be tied)
        output = {"output": model.output}
        quantize_layers(output, collect_hessians(output, (model.output(model.norm(x)) for x in xs)), swap=False)
        bar.update()
    bar.close()
    meta = {"mode": "int4-gptq", "groupsize": groupsize, "quantize_output": quantize_output, "layers": layers,
            "gptq": {"percdamp": percdamp, "blocksize": blocksize, "act_order": False,
                     "calibration_sequences": len(sequences), "calibration_tokens": sum(map(len, sequences))}}
    return add_unquantized(model, state, layers), meta


# ------------------------------------------------------------------------------------------ calibration data

def read_calibration_text(path: Path | None, tasks: list | None, max_chars: int) -> tuple[str, str]:
    """(text, where it came from) for GPTQ: a local text file, or lm-eval tasks' data when available offline."""
    if path and tasks:
        raise ValueError("pass either --calibration_file or --calibration_tasks, not both")
    if path:
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            text, source = f.read(max_chars), str(path)
    elif tasks:
        text, source = lm_eval_text(tasks, max_chars), f"lm_eval:{','.join(tasks)}"
    else:
        raise ValueError("--mode int4-gptq needs calibration text: pass --calibration_file PATH (e.g. WikiText)")
    if not text.strip():
        raise ValueError(f"the calibration text from {source} is empty")
    return text, source


def lm_eval_text(tasks: list, max_chars: int) -> str:
    """The documents of lm-eval tasks (training split, else validation, else test) as plain text."""
    hint = "use --calibration_file with a local text file (e.g. WikiText) instead"
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # use what is cached; never wait on a download
        os.environ.setdefault(var, "1")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(f"--calibration_tasks needs lm-eval >= 0.4.13, which is not installed; {hint}") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on task configs are not ours to print
    texts, chars = [], 0
    try:
        for task in TaskManager().load(list(tasks))["tasks"].values():
            docs = task.training_docs() if task.has_training_docs() else \
                task.validation_docs() if task.has_validation_docs() else task.test_docs()
            delimiter = getattr(task.config, "target_delimiter", " ")
            for doc in docs:
                parts = [p for p in (task.doc_to_text(doc), task.doc_to_target(doc)) if isinstance(p, str) and p]
                texts.append(delimiter.join(parts))
                chars += len(texts[-1])
                if chars >= max_chars:
                    break
            if chars >= max_chars:
                break
    except Exception as e:  # unknown task, dataset not cached, no network: one line, not lm-eval's traceback
        why = str(e).splitlines()[0][:150] if str(e) else type(e).__name__
        raise ValueError(f"cannot load the data of --calibration_tasks {' '.join(tasks)} offline ({why}); "
                         f"{hint}") from None
    return "\n\n".join(texts)


def calibration_sequences(tokenizer, text: str, limit: int, seq_length: int) -> list:
    """Up to `limit` consecutive windows of the text's tokens, seq_length long with BOS first, as prompts start
    (the last may be shorter)."""
    ids = tokenizer.encode(text, bos=False)
    n = seq_length - 1
    return [[tokenizer.bos_id] + ids[i:i + n] for i in range(0, len(ids), n)][:limit]


# ------------------------------------------------------------------------------------------------------- CLI

def output_path(checkpoint_path: Path, mode: str, groupsize: int) -> Path:
    suffix = "int8" if mode == "int8" else f"{mode}.g{groupsize}"
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_{suffix}.pth")


def check_args(args):
    if args.mode not in MODES:
        raise ValueError(f"unknown --mode {args.mode!r}; choose from {', '.join(MODES)}")
    if args.mode != "int8" and args.groupsize not in GROUP_SIZES:
        raise ValueError(f"--groupsize must be one of {', '.join(map(str, GROUP_SIZES))}")
    if args.mode != "int4-gptq":
        if args.calibration_file or args.calibration_tasks:
            raise ValueError(f"calibration data is for --mode int4-gptq; --mode {args.mode} does not use it")
        return
    if args.calibration_limit < 1 or args.calibration_seq_length < 2:
        raise ValueError("--calibration_limit must be >= 1 and --calibration_seq_length >= 2")
    if args.percdamp < 0 or args.blocksize < 1:
        raise ValueError("--percdamp must be >= 0 and --blocksize >= 1")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, required=True)
    p.add_argument("--mode", required=True, help=", ".join(MODES))
    p.add_argument("--groupsize", type=int, default=128, help=f"int4 group size: {', '.join(map(str, GROUP_SIZES))}")
    p.add_argument("--quantize_output", action=argparse.BooleanOptionalAction, default=True,
                   help="also quantize the output projection (gpt-fast does)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--device", default="cpu", help="where to run the quantization")
    g = p.add_argument_group("int4-gptq")
    g.add_argument("--calibration_file", type=Path, help="a local text file to calibrate on (e.g. WikiText)")
    g.add_argument("--calibration_tasks", nargs="+", metavar="TASK",
                   help="calibrate on lm-eval tasks' data (e.g. wikitext): needs lm-eval and its data cached")
    g.add_argument("--calibration_limit", type=int, default=128, help="number of calibration sequences")
    g.add_argument("--calibration_seq_length", type=int, default=2048,
                   help="tokens per calibration sequence (at most the model's context)")
    g.add_argument("--percdamp", type=float, default=0.01, help="Hessian dampening, a fraction of its mean diagonal")
    g.add_argument("--blocksize", type=int, default=128, help="columns quantized between lazy batch updates")
    g.add_argument("--tokenizer_path", type=Path, help="default: tokenizer.model beside the checkpoint")
    args = p.parse_args(argv)
    try:
        check_args(args)
        out = output_path(args.checkpoint_path, args.mode, args.groupsize)
        if out.exists() and not args.force:
            raise ValueError(f"{out} exists; pass --force to overwrite it")
        gptq = args.mode == "int4-gptq"
        if gptq:  # calibration mistakes show before the model is loaded
            from tokenizer import load_tokenizer
            text, calibration_source = read_calibration_text(
                args.calibration_file, args.calibration_tasks,
                max_chars=args.calibration_limit * args.calibration_seq_length * 16)  # ample for the tokens needed
            tokenizer = load_tokenizer(args.tokenizer_path or args.checkpoint_path.parent / "tokenizer.model")
        from generate import atomic_save, load_model
        t0 = time.perf_counter()
        model = load_model(args.checkpoint_path, args.device, precision=None)  # keep the stored dtypes
        # load_model marks quantized files (an isinstance test would miss them: run as a script, this module is
        # __main__, while load_model builds its layers from the imported `quantize`)
        if getattr(model, "quantization", None):
            raise ValueError(f"{args.checkpoint_path} is already quantized")
        if gptq:
            if tokenizer.vocab_size > model.config.vocab_size:
                raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                 f"{model.config.vocab_size}: wrong --tokenizer_path?")
            seq_length = min(args.calibration_seq_length, model.config.max_seq_len)
            sequences = calibration_sequences(tokenizer, text, args.calibration_limit, seq_length)
            dtypes = {k: t.dtype for k, t in model.state_dict().items()}
            state, meta = gptq_quantize_model(model.float(), sequences, args.groupsize, args.quantize_output,
                                              args.percdamp, args.blocksize)
            # calibration runs in float32; the tensors left unquantized are stored as they came
            state = {k: t if meta["layers"].get(k.rpartition(".")[0]) == "int4" else t.to(dtypes[k])
                     for k, t in state.items()}
            meta["gptq"] |= {"calibration_source": calibration_source, "calibration_seq_length": seq_length}
        else:
            state, meta = quantize_model(model, args.mode, args.groupsize, args.quantize_output)
    except (OSError, ValueError) as e:  # FileNotFoundError and TokenizerError included
        sys.exit(f"error: {e}")
    meta["source"] = str(args.checkpoint_path)
    state = {k: v.cpu() for k, v in state.items()}
    atomic_save({"quantization": meta, "state_dict": state}, out)
    kept = [f"{n} ({why})" for n, why in meta["layers"].items() if why not in ("int8", "int4")]
    if kept:
        print(f"not quantized: {'; '.join(kept)}", file=sys.stderr)
    if gptq:
        print(f"calibrated on {len(sequences)} sequences ({meta['gptq']['calibration_tokens']} tokens) from "
              f"{calibration_source}", file=sys.stderr)
    size = sum(v.numel() * v.element_size() for v in state.values()) / 1e6
    print(f"wrote {out} ({size:.0f} MB) in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
