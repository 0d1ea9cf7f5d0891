"""Embed a small trained model in a bigger model's shape (a preset): the result computes the small model's function
(its logits, up to float rounding) at the bigger shape's cost, because every added weight is zero. It makes
speculative-decoding pairs with real behaviour at realistic costs where nothing can be downloaded: e.g. a trained
target padded to tinyllama-1.1b's shape and a smaller trained draft padded to stories110M's (10x fewer weights).

    python scripts/pad_model.py --checkpoint_path checkpoints/small-code/model.pth --shape tinyllama-1.1b \
        --out checkpoints/small-code-1.1b

Why it is exact: the residual stream's added dimensions stay zero (zero embedding columns, zero output rows of
every layer); RMSNorm over D dimensions of which d are nonzero divides by sqrt(d / D) times the small model's
root mean square, which the norm weights (scaled by sqrt(d / D)) and norm_eps (scaled by d / D) undo; added heads
and FFN units have zero weights, so they add nothing (a zero query attends uniformly, to zero values or through
zero output columns); added layers add zero to the residual. The head size and the vocabulary stay the small
model's; query heads keep their key/value groups.
"""
import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import check_output_folder, check_output_path, cli_main  # noqa: E402
import torch  # noqa: E402

from llama_fast.checkpoint import TOKENIZER_NAME, check_is_file, read_config, read_state_dict  # noqa: E402
from llama_fast.integrity import save_checkpoint  # noqa: E402
from llama_fast.writing import atomic_save  # noqa: E402
from model_config import CONFIG_NAME, PRESETS, ModelArgs  # noqa: E402


def padded_config(small: ModelArgs, shape: dict) -> ModelArgs:
    """The shape's config (ModelArgs fields), with the small model's vocabulary, context and RoPE, and norm_eps
    scaled (see the module's docstring); a shape the model does not fit in is refused."""
    big = ModelArgs(**{**shape, "vocab_size": small.vocab_size})
    hd, rep_s, rep_b = small.head_dim, small.n_heads // small.n_kv_heads, big.n_heads // big.n_kv_heads
    checks = [(big.head_dim == hd, f"head size {big.head_dim}, not the model's {hd}"),
              (big.dim >= small.dim and big.n_layers >= small.n_layers and big.intermediate_size >=
               small.intermediate_size, "a smaller width, depth or FFN than the model's"),
              (big.n_kv_heads * rep_b >= small.n_kv_heads * max(rep_s, rep_b) and
               (max(rep_s, rep_b) % min(rep_s, rep_b) == 0), "key/value head groups the model's do not fit in")]
    for ok, why in checks:
        if not ok:
            raise ValueError(f"cannot pad into that shape: it has {why}")
    if small.n_experts or small.qkv_bias or small.qk_norm or small.sliding_window or small.tie_embeddings:
        raise ValueError("pad_model.py takes plain Llama models (no experts, biases, Q/K norms, window, tied output)")
    return replace(big, norm_eps=small.norm_eps * small.dim / big.dim, rope_theta=small.rope_theta,
                   rope_scaling=small.rope_scaling, max_seq_len=small.max_seq_len)


def head_places(small: ModelArgs, big: ModelArgs) -> list:
    """For each query head of the small model: (its head in the big one, the big key/value head it reads)."""
    rep_s, rep_b = small.n_heads // small.n_kv_heads, big.n_heads // big.n_kv_heads
    places = []
    for i in range(small.n_heads):
        j = (i // rep_s) * rep_b + i % rep_s if rep_b >= rep_s else i  # a group's heads stay in one group
        places.append((j, j // rep_b))
    return places


def pad_state(state: dict, small: ModelArgs, big: ModelArgs) -> dict:
    d, D, hd, F_ = small.dim, big.dim, small.head_dim, small.intermediate_size
    scale = math.sqrt(d / D)
    out = {"tok_embeddings.weight": torch.zeros(big.vocab_size, D), "output.weight": torch.zeros(big.vocab_size, D),
           "norm.weight": torch.zeros(D)}
    out["tok_embeddings.weight"][:, :d] = state["tok_embeddings.weight"]
    out["output.weight"][:, :d] = state["output.weight"]
    out["norm.weight"][:d] = state["norm.weight"].float() * scale
    H, Hk = big.n_heads, big.n_kv_heads
    for layer in range(big.n_layers):
        p = q = f"layers.{layer}."
        wqkv, wo = torch.zeros((H + 2 * Hk) * hd, D), torch.zeros(D, H * hd)
        w13, w2 = torch.zeros(2 * big.intermediate_size, D), torch.zeros(D, big.intermediate_size)
        norms = {name: torch.zeros(D) for name in ("attention_norm", "ffn_norm")}
        if layer < small.n_layers:
            s_qkv = state[q + "attention.wqkv.weight"].float()
            s_q, s_k, s_v = s_qkv.split([small.n_heads * hd, small.n_kv_heads * hd, small.n_kv_heads * hd])
            s_wo = state[q + "attention.wo.weight"].float()
            for i, (j, kv) in enumerate(head_places(small, big)):
                src_kv = i // (small.n_heads // small.n_kv_heads)
                wqkv[j * hd:(j + 1) * hd, :d] = s_q[i * hd:(i + 1) * hd]
                wqkv[(H + kv) * hd:(H + kv + 1) * hd, :d] = s_k[src_kv * hd:(src_kv + 1) * hd]
                wqkv[(H + Hk + kv) * hd:(H + Hk + kv + 1) * hd, :d] = s_v[src_kv * hd:(src_kv + 1) * hd]
                wo[:d, j * hd:(j + 1) * hd] = s_wo[:, i * hd:(i + 1) * hd]
            s_w13 = state[q + "feed_forward.w13.weight"].float()
            w13[:F_, :d], w13[big.intermediate_size:big.intermediate_size + F_, :d] = s_w13[:F_], s_w13[F_:]
            w2[:d, :F_] = state[q + "feed_forward.w2.weight"]
            for name in norms:
                norms[name][:d] = state[q + f"{name}.weight"].float() * scale
        out |= {p + "attention.wqkv.weight": wqkv, p + "attention.wo.weight": wo,
                p + "feed_forward.w13.weight": w13, p + "feed_forward.w2.weight": w2,
                **{p + f"{name}.weight": w for name, w in norms.items()}}
    return out


def run(args) -> int:
    if args.shape not in PRESETS:
        raise ValueError(f"unknown --shape {args.shape!r}; choose from: {', '.join(PRESETS)}")
    check_is_file(args.checkpoint_path, "checkpoint")
    small = read_config(args.checkpoint_path)
    big = padded_config(small, PRESETS[args.shape])
    check_output_folder(args.out, "--out")
    for name in ("model.pth", CONFIG_NAME):
        if args.out.is_dir():
            check_output_path(args.out / name, "--out", force=args.force)
    state = read_state_dict(args.checkpoint_path)
    if "quantization" in state:
        raise ValueError("pad a float checkpoint, then quantize the padded one")
    padded = pad_state(state, small, big)
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint({k: v.to(torch.bfloat16) for k, v in padded.items()}, args.out / "model.pth")
    atomic_save(big, args.out / CONFIG_NAME, save=lambda c, path: c.save(path))
    tokenizer, link = args.checkpoint_path.parent / TOKENIZER_NAME, args.out / TOKENIZER_NAME
    if tokenizer.exists() and not link.exists():
        os.symlink(tokenizer.resolve(), link)
    print(f"wrote {args.out / 'model.pth'}: {small.n_layers} layers of dim {small.dim} in {args.shape}'s shape")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, required=True, help="a float model.pth (e.g. train_small.py's)")
    p.add_argument("--shape", required=True, help="the preset whose shape to take, e.g. tinyllama-1.1b")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    cli_main(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
