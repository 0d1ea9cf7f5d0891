"""Build a random-weight Hugging Face checkpoint of a preset's shape, with a small SentencePiece tokenizer trained
on this repository's own text, so the whole pipeline (convert, generate, benchmark) runs with no download.

    python scripts/make_demo_checkpoint.py --model stories110M --out checkpoints/demo-stories110M

The weights are random: the text generated from them is gibberish, but its speed is real.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model_config import PRESETS, ModelArgs  # noqa: E402


def train_tokenizer(out_dir: Path, vocab_size: int = 1000) -> int:
    import sentencepiece as spm
    text = "\n".join(p.read_text(errors="ignore") for p in sorted(ROOT.glob("**/*")) if p.suffix in (".md", ".py"))
    corpus = out_dir / "demo_corpus.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model")).get_piece_size()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories110M", choices=PRESETS)
    p.add_argument("--out", type=Path, default=None, help="default: checkpoints/demo-<model>")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    out = args.out or ROOT / "checkpoints" / f"demo-{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    n_pieces = train_tokenizer(out)
    c = ModelArgs.from_name(args.model)
    if c.rope_scaling:
        sys.exit("error: demo checkpoints support presets without RoPE scaling")
    # the model's vocabulary is the tokenizer's: ids past it would decode to nothing (llama_fast.checkpoint.check_vocab)
    config = LlamaConfig(vocab_size=n_pieces, hidden_size=c.dim, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                         max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
                         bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    print(f"wrote a random-weight {args.model} checkpoint and a {n_pieces}-piece tokenizer to {out}")


if __name__ == "__main__":
    main()
