"""scripts/train_small.py: a few optimiser steps on a small text file lower the loss, and the written checkpoint
loads through checkpoint.load_model with the same logits as the trained module."""
import sys
from pathlib import Path

import torch
from conftest import english_ish

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train_small  # noqa: E402

from checkpoint import load_model  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import ModelArgs  # noqa: E402


def test_training_lowers_the_loss(sp_tokenizer):
    data = torch.tensor(sp_tokenizer.encode(" ".join(english_ish(200, seed=7))))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=sp_tokenizer.vocab_size,
                                  max_seq_len=64))
    losses = train_small.train(model, data, steps=60, seq_len=32, batch_size=8, lr=3e-3, log=lambda s: None)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:3]) / 3


def test_cli_writes_a_loadable_checkpoint(sp_model_path, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(english_ish(100, seed=8)))
    out = tmp_path / "small"
    train_small.main(["--text_file", str(text), "--tokenizer_path", str(sp_model_path), "--out", str(out),
                      "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "32",
                      "--batch_size", "4", "--steps", "5"])
    model = load_model(out / "model.pth", "cpu", torch.float32)
    assert (out / "tokenizer.model").resolve() == sp_model_path.resolve()
    state = torch.load(out / "model.pth", weights_only=True)
    reference = Transformer(model.config)
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    idx = torch.arange(1, 20)[None]
    torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=0)
