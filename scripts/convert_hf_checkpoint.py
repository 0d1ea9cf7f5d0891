"""Convert a Hugging Face Llama-family (Llama, Mistral, Qwen2, Qwen3) checkpoint directory into our model.pth +
model_config.json.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B

Reads config.json and the weights (safetensors or .bin, single file or sharded with an index), fuses Q/K/V and
gate/up, permutes Q/K rows from HF's rotate-half RoPE layout to Meta's interleaved one, and copies the
tokenizer (Llama-3's original/tokenizer.model) to tokenizer.model beside the checkpoint.
"""
import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_fast.cli import (check_output_path,  # noqa: E402 -- first, before torch: its Ctrl-C handler (see cli.py)
                            check_outputs, cli_main)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llama_fast.checkpoint import (HF_TOKENIZER_NAME, READ_BESIDE, TOKENIZER_NAME, check_shapes,  # noqa: E402
                                   read_state_dict)
from llama_fast.integrity import save_checkpoint  # noqa: E402
from llama_fast.writing import atomic_save  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import CONFIG_NAME, ModelArgs  # noqa: E402

LAYER_TENSORS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "input_layernorm",
                 "post_attention_layernorm"]
# a layer's FFN: dense (Llama), or the router and experts of Mixtral (w1 gate, w3 up, w2 down) or Qwen3-MoE
DENSE_FFN = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
MOE_FFN = {"block_sparse_moe": ("w1", "w3", "w2"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def weight_files(checkpoint_dir: Path) -> list:
    """The HF weight files: safetensors preferred, then PyTorch .bin; sharded (with an index) or a single file."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = checkpoint_dir / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError):
                raise ValueError(f"cannot read {index}: not a Hugging Face weight index") from None
        elif (checkpoint_dir / single_name).exists():
            names = [single_name]
        else:
            continue
        for name in names:
            if not (checkpoint_dir / name).exists():
                raise FileNotFoundError(f"{checkpoint_dir / name} is listed in {index_name} but missing: "
                                        "incomplete download?")
        return [checkpoint_dir / name for name in names]
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or their sharded index in {checkpoint_dir}")


def load_hf_state_dict(files: list) -> dict:
    """All tensors of the files, keyed without the "model." prefix (.bin is read with weights_only=True)."""
    state = {}
    for path in tqdm(files, desc="reading shards", unit="file", disable=len(files) < 2):
        state.update({k.removeprefix("model."): v for k, v in read_state_dict(path).items()})
    return state


def hf_rope_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    # HF stores each head's rows as [first halves | second halves]; Meta interleaves them in (even, odd) pairs.
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def attention_tensor_names(config: ModelArgs) -> list:
    """A layer's HF attention and norm tensors, without the "layers.N." prefix: Llama's, plus Qwen2's Q/K/V biases
    and Qwen3's per-head Q/K norms when the config has them."""
    names = [f"{n}.weight" for n in LAYER_TENSORS]
    if config.qkv_bias:
        names += [f"self_attn.{n}.bias" for n in ("q_proj", "k_proj", "v_proj")]
    if config.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return names


def ffn_tensor_names(config: ModelArgs, hf: dict, i: int) -> list:
    """Layer i's HF FFN tensors: [gate, up, down] (dense), or the router then gate, up, down of each expert."""
    if not config.n_experts:
        return list(DENSE_FFN)
    block = "block_sparse_moe" if f"layers.{i}.block_sparse_moe.gate.weight" in hf else "mlp"
    return [f"{block}.gate.weight"] + [f"{block}.experts.{e}.{p}.weight" for e in range(config.n_experts)
                                       for p in MOE_FFN[block]]


def convert_state_dict(hf: dict, config: ModelArgs) -> dict:
    """Our state dict from the HF one, which it empties as it goes so the two copies never coexist in memory."""
    needed = ["embed_tokens.weight", "norm.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    needed += [f"layers.{i}.{name}" for i in range(config.n_layers)
               for name in attention_tensor_names(config) + ffn_tensor_names(config, hf, i)]
    missing = [name for name in needed if name not in hf]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the weights, first {missing[0]}: "
                         "incomplete download, or config.json does not describe these weights")
    out = {"tok_embeddings.weight": hf.pop("embed_tokens.weight"), "norm.weight": hf.pop("norm.weight")}
    out["output.weight"] = out["tok_embeddings.weight"] if config.tie_embeddings else hf.pop("lm_head.weight")
    for i in tqdm(range(config.n_layers), desc="converting layers", unit="layer", disable=config.n_layers < 8):
        p = f"layers.{i}."
        ffn = [hf.pop(p + name) for name in ffn_tensor_names(config, hf, i)]
        attention = {name.removesuffix(".weight"): hf.pop(p + name) for name in attention_tensor_names(config)}
        for name, t in {**convert_attention(attention, config), **convert_ffn(ffn, config)}.items():
            out[p + name] = t
    return {k: v.contiguous() for k, v in out.items()}


def convert_attention(w: dict, config: ModelArgs) -> dict:
    """Q, K, V fused with Q and K rows (and their biases, and the Q/K norms' weights) in Meta's RoPE layout."""
    H, Hkv, D = config.n_heads, config.n_kv_heads, config.head_dim
    q = hf_rope_to_interleaved(w["self_attn.q_proj"], H, D)
    k = hf_rope_to_interleaved(w["self_attn.k_proj"], Hkv, D)
    out = {"attention.wqkv.weight": torch.cat([q, k, w["self_attn.v_proj"]]),
           "attention.wo.weight": w["self_attn.o_proj"],
           "attention_norm.weight": w["input_layernorm"], "ffn_norm.weight": w["post_attention_layernorm"]}
    if config.qkv_bias:  # one bias per output row: permuted as the rows are
        out["attention.qkv_bias"] = torch.cat([
            hf_rope_to_interleaved(w["self_attn.q_proj.bias"][:, None], H, D)[:, 0],
            hf_rope_to_interleaved(w["self_attn.k_proj.bias"][:, None], Hkv, D)[:, 0], w["self_attn.v_proj.bias"]])
    if config.qk_norm:  # one weight per position within a head: permuted as a head's rows are
        for name in ("q_norm", "k_norm"):
            out[f"attention.{name}.weight"] = hf_rope_to_interleaved(w[f"self_attn.{name}"][:, None], 1, D)[:, 0]
    return out


def convert_ffn(ffn: list, config: ModelArgs) -> dict:
    """gate and up fused into w13; for a mixture of experts the router, and every expert's w13 and w2 stacked."""
    if not config.n_experts:
        gate, up, down = ffn
        return {"feed_forward.w13.weight": torch.cat([gate, up]), "feed_forward.w2.weight": down}
    router, experts = ffn[0], [ffn[1 + 3 * e:4 + 3 * e] for e in range(config.n_experts)]
    return {"feed_forward.gate.weight": router,
            "feed_forward.w13.weight": torch.stack([torch.cat([gate, up]) for gate, up, _ in experts]),
            "feed_forward.w2.weight": torch.stack([down for _, _, down in experts])}
def same_config(path: Path, config: ModelArgs) -> bool:
    try:
        return path.is_file() and json.loads(path.read_text()) == asdict(config)
    except ValueError:
        return False


def inputs(checkpoint_dir: Path, weights: list) -> dict:
    """What conversion reads, and what loaders read beside its output (model_config.json, which it writes, aside):
    --output_name must be none of them, whether they exist yet or not."""
    names = ["config.json", "original/tokenizer.model", *(n for n in READ_BESIDE if n != CONFIG_NAME)]
    return {f"the Hugging Face weights {path.name}": path for path in weights} | \
        {name: checkpoint_dir / name for name in names}


def convert(checkpoint_dir, output_name: str = "model.pth", force: bool = False) -> Path:
    """Write our checkpoint and config beside the HF files; existing ones are only replaced with force."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {checkpoint_dir} a downloaded Hugging Face model?")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ValueError(f"cannot read {config_path}: {e}") from None
    try:
        config = ModelArgs.from_hf_config(hf_config)
    except (ValueError, TypeError, AttributeError) as e:  # a field missing, of the wrong type or out of range
        raise ValueError(f"invalid {config_path}: {e}") from None
    files = weight_files(checkpoint_dir)
    out_path = checkpoint_dir / output_name
    check_outputs({"the converted config": checkpoint_dir / CONFIG_NAME, "--output_name": out_path},
                  inputs(checkpoint_dir, files))  # even with --force
    # before reading gigabytes of weights; a config file that already says the same is not a replacement
    check_output_path(out_path, "output", force)
    config_out = checkpoint_dir / CONFIG_NAME
    check_output_path(config_out, "output", force or same_config(config_out, config))
    try:
        state = convert_state_dict(load_hf_state_dict(files), config)
    except RuntimeError as e:  # a view/cat on tensors of unexpected shapes
        raise ValueError(f"weights do not match {config_path}: {str(e).splitlines()[0][:200]}") from None
    with torch.device("meta"):
        check_shapes(state, Transformer(config), config_path)  # before anything is written
    if output_name.endswith(".safetensors"):
        if config.tie_embeddings:
            state.pop("output.weight")  # safetensors refuses shared storage; loaders re-tie from the config
        save_checkpoint(state, out_path, save=lambda s, p: save_file(s, str(p)))
    else:
        save_checkpoint(state, out_path)  # tied weights share one storage, so torch.save writes them once
    atomic_save(config, config_out, save=lambda c, p: c.save(p))
    if not (checkpoint_dir / TOKENIZER_NAME).exists():
        if (checkpoint_dir / "original/tokenizer.model").exists():  # Llama-3 ships it only there
            atomic_save(checkpoint_dir / "original/tokenizer.model", checkpoint_dir / TOKENIZER_NAME,
                        save=shutil.copyfile)
        elif not (checkpoint_dir / HF_TOKENIZER_NAME).exists():
            print(f"warning: no tokenizer.model or tokenizer.json in {checkpoint_dir}; generate.py will need "
                  "--tokenizer_path", file=sys.stderr)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="directory holding the HF files")
    parser.add_argument("--output_name", default="model.pth", help="model.pth (default) or a name ending in "
                        ".safetensors; written beside the HF files")
    parser.add_argument("--force", action="store_true", help="replace an existing converted checkpoint and config")
    cli_main(run, parser.parse_args(argv))


def run(args) -> int:
    if Path(args.output_name).name != args.output_name:
        raise ValueError(f"--output_name must be a file name, not a path: {args.output_name}")
    out = convert(args.checkpoint_dir, args.output_name, args.force)
    print(f"wrote {out} and {out.parent / CONFIG_NAME}")
    return 0


if __name__ == "__main__":
    main()
