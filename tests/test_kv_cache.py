"""llama_fast/quant/kv_cache.py: the int8 KV caches. The quantization against exact math; the static cache
(generate.py --kv_cache_dtype int8) against itself read other ways (compiled, speculative verification) and against
the float cache. The paged pool's tests are in test_engine.py (Int8PagedKVCache under load)."""
import pytest
import torch
from helpers import BASE, N_NEW, assert_ran_cleanly, run_cli

from decoding import generate
from llama_fast.quant.kv_cache import Int8KVCache, dequantize, quantize, use_int8_kv_cache
from llama_fast.speculate.lookahead import Lookahead, LookaheadConfig
from llama_fast.speculate.speculative import PromptLookup, speculative_generate
from sampling import SamplingConfig

pytestmark = pytest.mark.device
GREEDY = SamplingConfig(temperature=0)


def test_quantization_is_within_half_a_step():
    """Each vector (token, head) is stored as int8 and a float16 scale: elementwise error at most half the scale
    (exact math), zeros stay zeros, an outlier sets its own vector's scale only."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, 32) * torch.logspace(-6, 3, 64)[:, None, None]
    x[3] = 0
    x[5, 1, 7] = 5e3
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and q.abs().max() <= 127
    err = (dequantize(q, scale, torch.float32) - x).abs()
    assert (err <= scale.float()[..., None] / 2 * (1 + 1e-3)).all()
    assert (dequantize(q, scale, torch.float32)[3] == 0).all() and not err.isnan().any()
    assert scale[5, 0] < scale[5, 1] / 100


def test_int8_static_cache_decodes_like_itself_every_way(hf_checkpoint, load_ours, prompt_ids):
    """generate() with the int8 static cache: a batch of left-padded prompts gives each row what it gets alone;
    prompt lookup and lookahead (several-token verification over the dequantized cache) give the plain int8 greedy
    tokens; and most tokens agree with the float cache's (the share is printed). Compiled: the next test."""
    _, d = hf_checkpoint("gqa")
    model = use_int8_kv_cache(load_ours(d))
    floats = load_ours(d)
    prompts = [prompt_ids(n, seed=20 + n) for n in (9, 23, 40)]
    alone = [generate(model, [p], 24, GREEDY).tokens[0] for p in prompts]
    assert isinstance(model.layers[0].attention.kv_cache, Int8KVCache)
    assert generate(model, prompts, 24, GREEDY).tokens == alone
    repeating = (prompt_ids(7, seed=5) * 5)[:30]
    plain = generate(model, [repeating], 30, GREEDY).tokens[0]
    for proposer in (PromptLookup(2), Lookahead(LookaheadConfig(3, 3, 2))):
        assert speculative_generate(model, [repeating], 30, GREEDY, proposer=proposer, speculate_k=4).tokens[0] \
            == plain
    reference = [generate(floats, [p], 24, GREEDY).tokens[0] for p in prompts]
    same = sum(a == b for mine, theirs in zip(alone, reference) for a, b in zip(mine, theirs))
    print(f"int8 KV: {same} of {24 * len(prompts)} greedy tokens equal to the float cache's")
    assert same >= 24 * len(prompts) // 2


def test_generate_cli_with_an_int8_kv_cache(hf_checkpoint, load_cpu, sp_tokenizer):
    """generate.py --kv_cache_dtype int8 --compile --prompt_lookup 2 (compiled one-token steps reading the cache in
    attend_one's fused sums with the scales outside them, several-token verification) prints what eager generate()
    gives in-process with the int8 static cache."""
    _, d = hf_checkpoint("gqa")
    model = use_int8_kv_cache(load_cpu(d))
    prompt = "The quick dog sees a red bird and the red bird sees the quick dog and the"
    row = generate(model, [sp_tokenizer.encode(prompt)], N_NEW, GREEDY, sp_tokenizer.eos_ids).tokens[0]
    want = prompt + sp_tokenizer.decode([t for t in row if t not in sp_tokenizer.eos_ids]) + "\n"
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", prompt, *BASE, "--kv_cache_dtype", "int8",
                   "--compile", "--prompt_lookup", "2")
    assert_ran_cleanly(proc)
    assert proc.stdout == want
