"""GPTQ (Frantar et al. 2022): int4 weights whose rounding minimises each layer's output error on calibration
text, in qlinear's int4 format, so the result loads and runs like round-to-nearest int4 (as gpt-fast's GPTQ.py).

    state, meta = gptq_quantize_model(model.float(), calibration_sequences(tokenizer, text, 128, 2048), 128)
"""
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from llama_fast.quant.qlinear import (add_unquantized, dequantize_int4, int4_entries, int4_qparams, int4_skip_reason,
                                      pad_to_groups)


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
def gptq_linear(name: str, layer: nn.Linear, hessian: Tensor, groupsize: int, percdamp: float, blocksize: int,
                swap: bool) -> dict:
    """Int4Linear's state dict entries for one layer; swap: replace its weights by their dequantized values, so
    that the layers after it calibrate on what the quantized model computes."""
    w = pad_to_groups(layer.weight.detach().float(), groupsize)
    pad = w.shape[1] - layer.in_features  # padding columns get zero rows in H: GPTQ treats them as dead inputs
    try:
        codes, qparams = gptq_quantize(w, F.pad(hessian.float(), (0, pad, 0, pad)), groupsize, percdamp, blocksize)
    except torch.linalg.LinAlgError:
        raise ValueError(f"GPTQ of {name}: its Hessian is not positive definite; raise --percdamp") from None
    if swap:
        layer.weight.copy_(dequantize_int4(codes, qparams, groupsize)[:, :layer.in_features])
    return int4_entries(codes, qparams)


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, sequences: list, groupsize: int = 128, quantize_output: bool = True,
                        percdamp: float = 0.01, blocksize: int = 128, progress: bool = True) -> tuple[dict, dict]:
    """int4 GPTQ of every linear layer of a float32 Transformer, calibrated on `sequences` (lists of token ids)
    one block at a time, so only one depth's activations are held; each block is quantized (and swapped) before
    the next one's inputs are computed through it. Returns (state_dict, quantization metadata)."""
    layers, state = {}, {}

    def quantize_layers(linears: dict, forward, swap: bool):
        hessians = collect_hessians(linears, forward)
        for name, layer in linears.items():
            reason = int4_skip_reason(layer)
            layers[name] = f"kept in {layer.weight.dtype}: {reason}" if reason else "int4"
            if not reason:
                entries = gptq_linear(name, layer, hessians[name], groupsize, percdamp, blocksize, swap)
                state.update({f"{name}.{key}": t for key, t in entries.items()})

    device = model.tok_embeddings.weight.device
    xs = [model.tok_embeddings(torch.tensor([s], device=device)) for s in sequences]
    for i, block in enumerate(tqdm(model.layers, desc=f"GPTQ int4 g{groupsize}", disable=not progress,
                                   file=sys.stderr)):
        quantize_layers({f"layers.{i}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)},
                        run_block(block, xs, model), swap=True)
        for j, y in enumerate(run_block(block, xs, model)):  # the next block's inputs, through this block
            xs[j] = y  # quantized, in place: one set of activations is held
    if quantize_output:  # from the final norm's output; not swapped in: nothing comes after it (and it may be tied)
        quantize_layers({"output": model.output}, (model.output(model.norm(x)) for x in xs), swap=False)
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
    """Up to `limit` consecutive windows of the text's tokens, seq_length long with BOS first (if the tokenizer has
    one), as prompts start (the last may be shorter)."""
    ids = tokenizer.encode(text, bos=False)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    n = seq_length - len(bos)
    return [bos + ids[i:i + n] for i in range(0, len(ids), n)][:limit]
