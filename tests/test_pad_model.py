"""scripts/pad_model.py: a model embedded in a bigger shape computes the same logits (float32, the reference being
the small model itself), for both ways key/value head groups map, and the command writes a loadable checkpoint."""
from pathlib import Path

import pytest
import torch

import pad_model
from llama_fast.checkpoint import load_model
from model import Transformer
from model_config import ModelArgs

ROOT = Path(__file__).resolve().parent.parent

SMALL = dict(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=300, max_seq_len=64, intermediate_size=200)


def random_small(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**SMALL, **overrides}))
    for name, p in model.named_parameters():  # norms away from one, so that their scaling is tested
        torch.nn.init.normal_(p, 1.0 if name.endswith("norm.weight") else 0.0, 0.3 if "norm" in name else 0.05)
    return model.eval()


@pytest.mark.parametrize("small,shape", [
    (dict(n_heads=2, n_kv_heads=1), dict(dim=384, n_layers=4, n_heads=6, n_kv_heads=6, intermediate_size=512)),
    (dict(n_heads=4, n_kv_heads=2, dim=256), dict(dim=512, n_layers=3, n_heads=8, n_kv_heads=2,
                                                   intermediate_size=768))])
def test_padded_model_computes_the_same_logits(small, shape):
    model = random_small(**small)
    big = pad_model.padded_config(model.config, shape)
    padded = Transformer(big)
    padded.load_state_dict(pad_model.pad_state(model.state_dict(), model.config, big))
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(idx), padded.eval()(idx)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    # and the added weights are really there, at the bigger shape's cost
    assert sum(p.numel() for p in padded.parameters()) > 2 * sum(p.numel() for p in model.parameters())


def test_a_shape_the_model_does_not_fit_in_is_refused():
    with pytest.raises(ValueError, match="smaller width"):
        pad_model.padded_config(random_small().config, dict(dim=64, n_layers=4, n_heads=1))
    with pytest.raises(ValueError, match="head size"):
        pad_model.padded_config(random_small().config, dict(dim=512, n_layers=4, n_heads=4))


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    model = random_small()
    src = tmp_path / "small"
    src.mkdir()
    torch.save(model.state_dict(), src / "model.pth")
    model.config.save(src / "model_config.json")
    pad_model.main(["--checkpoint_path", str(src / "model.pth"), "--shape", "stories110M", "--out",
                    str(tmp_path / "big")])
    big = load_model(tmp_path / "big" / "model.pth", "cpu", torch.float32)
    assert (big.config.dim, big.config.n_layers) == (768, 12)
    idx = torch.arange(1, 30)[None]
    with torch.no_grad():  # stored in bf16: the bf16-rounded small model is the reference
        ref = Transformer(model.config)
        ref.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
        want = ref.eval()(idx)
        assert (big(idx) - want).abs().max().item() < 1e-2 * want.abs().max().item()
