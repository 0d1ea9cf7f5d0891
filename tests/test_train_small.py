"""scripts/train_small.py: a few optimiser steps on a small text file lower the loss, and the written checkpoint
loads through checkpoint.load_model with the same logits as the trained module."""
from pathlib import Path

import torch
from conftest import english_ish

import train_small
from llama_fast.checkpoint import load_model
from model import Transformer
from model_config import ModelArgs

ROOT = Path(__file__).resolve().parent.parent


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


def test_cli_trains_its_own_tokenizer(tmp_path):
    """--vocab_size: a SentencePiece tokenizer of that size, trained on the text, written beside the model; it
    round-trips the text (indentation and newlines included) and the model's vocabulary is its size."""
    from tokenizer import load_tokenizer

    text = tmp_path / "code.py"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i}  # {w}\n" for i, w in
                              enumerate(english_ish(150, seed=9))))
    out = tmp_path / "small"
    train_small.main(["--text_file", str(text), "--vocab_size", "400", "--out", str(out), "--dim", "64",
                      "--n_layers", "1", "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "32", "--batch_size", "2",
                      "--steps", "2"])
    tok = load_tokenizer(out / "tokenizer.model")
    assert tok.vocab_size == 400 and load_model(out / "model.pth", "cpu", torch.float32).config.vocab_size == 400
    sample = text.read_text()[:300]
    assert tok.decode(tok.encode(sample)) == sample


def test_repeat_windows_hold_bos_a_passage_the_request_and_the_passage_again(sp_model_path):
    """A repeat window is BOS, a passage (10-45% of the window: the text's, or random ids past the byte pieces), the
    request (encoded alone, or as it follows text), the passage again, and the text after the passage."""
    from tokenizer import load_tokenizer

    window, gen = torch.arange(1000, 1100), torch.Generator().manual_seed(0)
    repeats = train_small.Repeats(1.0, ([7, 8, 9], [8, 9]), bos=1, random_ids=(300, 400), random_fraction=0.5)
    kinds = set()
    for _ in range(40):
        out = repeats.window(window, gen).tolist()
        start = out.index(8) - (out[out.index(8) - 1] == 7)  # the request's ids are in neither kind of passage
        passage, request, after = out[1:start], out[start:out.index(8) + 2], out[out.index(8) + 2:]
        again, rest = after[:len(passage)], after[len(passage):]
        assert len(out) == 100 and out[0] == 1 and 10 <= len(passage) <= 45 and again == passage[:len(again)]
        assert rest == window[len(passage):len(passage) + len(rest)].tolist()
        from_text = passage == window[:len(passage)].tolist()
        assert from_text or all(300 <= t < 400 for t in passage)
        kinds.add((from_text, tuple(request)))
    assert kinds == {(True, (7, 8, 9)), (True, (8, 9)), (False, (7, 8, 9)), (False, (8, 9))}
    tok = load_tokenizer(sp_model_path)
    alone, after = train_small.request_ids(tok, "\n\nThe same text again:\n\n")
    assert tok.encode("Some text.\n\nThe same text again:\n\n", bos=False)[-len(after):] == after
    assert tok.decode(alone) == tok.decode(after) == "\n\nThe same text again:\n\n"


def test_init_goes_on_from_a_checkpoint(sp_model_path, tmp_path):
    """--init: training starts from that model's weights (with lr 0 they come out unchanged) in its shape,
    whatever --dim etc. say."""
    text = tmp_path / "train.txt"
    text.write_text("\n".join(english_ish(100, seed=8)))
    common = ["--text_file", str(text), "--tokenizer_path", str(sp_model_path), "--seq_len", "32", "--batch_size", "2"]
    train_small.main([*common, "--out", str(tmp_path / "a"), "--dim", "64", "--n_layers", "2", "--n_heads", "4",
                      "--n_kv_heads", "2", "--steps", "3"])
    train_small.main([*common, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "model.pth"),
                      "--dim", "128", "--steps", "2", "--lr", "0"])
    a, b = (torch.load(tmp_path / d / "model.pth", weights_only=True) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train_small.main([*common, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "a" / "model.pth"),
                      "--steps", "2"])
    c = torch.load(tmp_path / "c" / "model.pth", weights_only=True)
    assert c["output.weight"].shape == a["output.weight"].shape and not torch.equal(c["output.weight"],
                                                                                       a["output.weight"])
