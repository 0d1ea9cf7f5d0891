"""model.py and the HF converter against Hugging Face transformers' LlamaForCausalLM (the reference), float32.
Our model runs on --device (the reference stays on CPU; our outputs are compared there)."""
import json

import pytest
import torch
from conftest import HF_CONFIGS, VOCAB_SIZE, hf_greedy, on_cpu

import decoding
import model as model_mod
from model import Transformer
from model_config import PRESETS, ModelArgs
from sampling import SamplingConfig

CONFIG_NAMES = list(HF_CONFIGS)
LOGITS_ATOL = 1e-4
CACHE_ATOL = 1e-5


def cache_atol(device) -> float:
    """Our model against itself with other shapes (cached steps, last_only). On CUDA a 1-token step and a 64-token
    forward run other cuBLAS / SDPA kernels (GEMV vs GEMM, other tilings), so float32 sums are added in another order:
    a little more rounding difference than on CPU (TF32 is off, see conftest)."""
    return CACHE_ATOL if on_cpu(device) else 5 * CACHE_ATOL


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def pair(request, hf_checkpoint, load_ours):
    hf, d = hf_checkpoint(request.param)
    return request.param, hf, load_ours(d), d


def test_sharded_checkpoint_really_is_sharded(hf_checkpoint):
    _, d = hf_checkpoint("sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert all((d / s).is_file() for s in shards)
    assert not (d / "model.safetensors").exists()


def test_converted_config_matches_hf(pair):
    name, hf, ours, d = pair
    c, hc = ours.config, hf.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads) == (64, 2, 4, hc.num_key_value_heads)
    assert c.vocab_size == VOCAB_SIZE and c.head_dim == (32 if name == "qwen3" else 16)
    assert c.intermediate_size == (48 if name == "qwen3_moe" else 172)
    assert (c.n_experts, c.n_active_experts, c.norm_topk_prob) == {"mixtral": (8, 2, True),
                                                                    "qwen3_moe": (6, 2, False)}.get(name, (0, 0, True))
    assert c.tie_embeddings == (name in ("tied", "qwen2"))
    assert (c.qkv_bias, c.qk_norm) == (name == "qwen2", name in ("qwen3", "qwen3_moe"))
    if c.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight
    assert c.sliding_window == (24 if name == "mistral_window" else 0)
    if name == "llama3_rope":
        assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3"
        # the scaling really changes frequencies for this head size
        plain = model_mod.rope_frequencies(ModelArgs(dim=64, n_heads=4, rope_theta=500000.0))
        assert not torch.allclose(model_mod.rope_frequencies(c), plain)


def test_logits_match_hf(pair, prompt_ids, device):
    name, hf, ours, _ = pair
    idx = torch.tensor([prompt_ids(64, seed=1)])
    with torch.no_grad():
        ref = hf(idx).logits
    x = idx.to(device)
    got = ours(x).cpu()
    assert got.dtype == torch.float32 and got.shape == ref.shape == (1, 64, VOCAB_SIZE)
    diff = (got - ref).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{name}: max abs diff {diff}"
    # logits are not trivially small: the tolerance is meaningful
    assert ref.std().item() > 0.5
    # last_only returns the last position only (a matrix-vector product there: rounding differs slightly)
    torch.testing.assert_close(ours(x, last_only=True).cpu(), got[:, -1:], rtol=0, atol=cache_atol(device))


def test_attention_takes_sdpa_output_in_cuda_layout(pair, prompt_ids, device, monkeypatch):
    """CUDA's SDPA kernels return (B, heads, T, D) values stored T-major: GQA layers (several query heads per KV
    head, folded into the rows) must not assume a contiguous output. Same values, that layout, same logits."""
    name, _, ours, _ = pair
    x = torch.tensor([prompt_ids(32, seed=4)], device=device)
    want = ours(x)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(ours(x), want, rtol=0, atol=0, msg=name)


def test_greedy_continuation_matches_hf(pair, prompt_ids):
    name, hf, ours, _ = pair
    prompt = prompt_ids(64, seed=2)
    ref = hf_greedy(hf, [prompt], 32)[0]
    res = decoding.generate(ours, [prompt], 32, SamplingConfig(temperature=0), eos_ids=())
    assert res.tokens == [ref], name
    assert res.prompt_tokens == [64] and res.stopped == [False] and res.decode_tokens == 31


def test_kv_cache_prefill_then_decode_equals_full_forward(pair, prompt_ids, device):
    name, _, ours, _ = pair
    idx = torch.tensor([prompt_ids(64, seed=3)], device=device)
    full = ours(idx)  # no cache
    ours.setup_caches(1, 64)
    parts = [ours(idx[:, :40], torch.arange(40, device=device))]
    for t in range(40, 64):
        parts.append(ours(idx[:, t:t + 1], torch.tensor([t], device=device)))
    cached = torch.cat(parts, dim=1)
    assert cached.shape == full.shape
    diff = (cached - full).abs().max().item()
    assert diff <= cache_atol(device), f"{name}: max abs diff {diff}"


def test_kv_cache_in_a_longer_cache_with_batch(hf_checkpoint, load_ours, prompt_ids, device):
    """The cache may be longer than what was written so far and hold several rows: unwritten slots are masked."""
    hf, d = hf_checkpoint("gqa")
    ours = load_ours(d)
    idx = torch.tensor([prompt_ids(48, seed=4), prompt_ids(48, seed=5)])
    with torch.no_grad():
        ref = hf(idx).logits
    ours.setup_caches(2, 200)
    assert ours.cache_len == 200 and ours.config.max_seq_len == 256  # the cache, not the trained context
    x = idx.to(device)
    parts = [ours(x[:, :17], torch.arange(17, device=device))]
    for t in range(17, 48):
        parts.append(ours(x[:, t:t + 1], torch.tensor([t], device=device)))
    assert (torch.cat(parts, 1).cpu() - ref).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("name", ["mha", "mistral_window"])
def test_left_padded_forward_equals_unpadded(name, hf_checkpoint, load_ours, prompt_ids, device):
    """Rows left-padded by k slots give the logits of the same row alone (padding masked, RoPE positions shifted;
    with a sliding window of 24, the window counted from each row's own tokens)."""
    hf, d = hf_checkpoint(name)
    ours = load_ours(d)
    rows = [prompt_ids(n, seed=10 + n) for n in (30, 21, 9)]
    T = 30
    pad = torch.tensor([T - len(r) for r in rows], device=device)
    idx = torch.tensor([[5] * (T - len(r)) + r for r in rows], device=device)
    ours.setup_caches(3, 64)
    got = ours(idx, torch.arange(T, device=device), pad).cpu()
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf(torch.tensor([r])).logits[0]
        assert (got[i, T - len(r):] - ref).abs().max().item() <= LOGITS_ATOL
    assert torch.isfinite(got).all()


def test_sliding_window_matters_past_the_window(hf_checkpoint, load_ours, prompt_ids, device):
    """The window-24 model's logits equal full attention's for the first 24 positions and differ after (so the
    parity tests above really test the window), and a batch generated past the window through the KV cache equals
    each prompt alone."""
    _, d = hf_checkpoint("mistral_window")
    ours = load_ours(d)
    x = torch.tensor([prompt_ids(64, seed=7)], device=device)
    windowed = ours(x).cpu()
    ours.config.sliding_window = 0
    full = ours(x).cpu()
    ours.config.sliding_window = 24
    assert torch.equal(windowed[:, :24], full[:, :24]) and (windowed[:, 24:] - full[:, 24:]).abs().max() > 1e-2
    prompts = [prompt_ids(n, seed=20 + n) for n in (40, 13)]
    greedy = SamplingConfig(temperature=0)
    batch = decoding.generate(ours, prompts, 30, greedy, eos_ids=()).tokens
    assert batch == [decoding.generate(ours, [p], 30, greedy, eos_ids=()).tokens[0] for p in prompts]


# ------------------------------------------------------------------------------------------- ModelArgs


def test_from_hf_config_fields():
    from transformers import LlamaConfig

    hc = LlamaConfig(vocab_size=1234, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=2, intermediate_size=200, max_position_embeddings=777, rms_norm_eps=1e-6,
                     rope_theta=12345.0, tie_word_embeddings=True, head_dim=32,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    a = ModelArgs.from_hf_config(hc.to_dict())
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (96, 3, 6, 2, 1234)
    assert (a.intermediate_size, a.head_dim, a.max_seq_len) == (200, 32, 777)
    assert a.norm_eps == 1e-6 and a.rope_theta == 12345.0 and a.tie_embeddings is True
    assert a.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

    # the transformers-4 layout (rope_theta at top level, rope_scaling with the old "type" key) reads the same
    legacy = {"model_type": "llama", "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
              "num_key_value_heads": 2, "vocab_size": 1234, "intermediate_size": 200, "head_dim": 32,
              "max_position_embeddings": 777, "rms_norm_eps": 1e-6, "rope_theta": 12345.0,
              "tie_word_embeddings": True,
              "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    assert ModelArgs.from_hf_config(legacy) == a

    # defaults: no GQA, no scaling, theta 10000, untied
    plain = ModelArgs.from_hf_config(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64).to_dict())
    assert plain.n_kv_heads == 4 and plain.head_dim == 8 and plain.rope_scaling == {}
    assert plain.rope_theta == 10000.0 and plain.tie_embeddings is False


def test_model_args_save_load_round_trip(tmp_path, hf_checkpoint):
    hf, d = hf_checkpoint("llama3_rope")
    a = ModelArgs.from_hf_config(json.loads((d / "config.json").read_text()))
    assert ModelArgs.load(d / "model_config.json") == a  # what the converter wrote
    a.save(tmp_path / "c.json")
    assert ModelArgs.load(tmp_path / "c.json") == a


@pytest.mark.parametrize("bad", [{"model_type": "gpt2"}, {"hidden_act": "gelu"}, {"attention_bias": True},
                                 {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}])
def test_from_hf_config_rejects_unsupported(bad):
    cfg = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
           "vocab_size": 50, "intermediate_size": 64, **bad}
    with pytest.raises(ValueError):
        ModelArgs.from_hf_config(cfg)


def test_default_intermediate_size_and_gqa_check():
    # Meta's FeedForward: hidden = int(2 * 4 * dim / 3), rounded up to a multiple of 256
    assert ModelArgs(dim=4096).intermediate_size == 11008
    assert ModelArgs(dim=288, n_heads=6).intermediate_size == 768
    with pytest.raises(ValueError):
        ModelArgs(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError):
        ModelArgs.from_name("no-such-model")


def _llama_param_count(a: ModelArgs) -> int:
    """The Llama parameter count written out from the architecture."""
    attn = a.dim * a.n_heads * a.head_dim * 2 + a.dim * a.n_kv_heads * a.head_dim * 2  # q, o; k, v
    mlp = 3 * a.dim * a.intermediate_size * max(a.n_experts, 1) + a.dim * a.n_experts  # gate, up, down; router
    per_layer = attn + mlp + 2 * a.dim  # two RMSNorms
    embeddings = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
    return a.n_layers * per_layer + embeddings + a.dim  # final norm


# Parameter counts as reported by Hugging Face (model.num_parameters()) for the published checkpoints.
PUBLISHED_COUNTS = {
    "tinyllama-1.1b": 1_100_048_384,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "mistral-7b": 7_241_732_096,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_on_meta_with_right_parameter_count(name):
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        m = Transformer(args)
    n = sum(p.numel() for p in m.parameters())  # parameters() counts a tied weight once
    assert n == _llama_param_count(args)
    if name in PUBLISHED_COUNTS:
        assert n == PUBLISHED_COUNTS[name]
