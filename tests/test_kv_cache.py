"""llama_fast/quant/kv_cache.py: the int8 KV caches. The quantization against exact math; the static cache
(generate.py --kv_cache_dtype int8) against itself read other ways (compiled, speculative verification) and against
the float cache. The paged pool's tests are in test_engine.py (Int8PagedKVCache under load)."""
import unittest.mock

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


@pytest.mark.parametrize("n_rep", [1, 2])
def test_compiled_verification_reads_the_int8_cache_in_fused_sums(n_rep):
    """A compiled CPU step of several tokens per row (speculative or lookahead verification: 5 tokens, a causal
    block or a tree mask) reads the int8 cache in attend_several's fused sums, never a dequantized copy of it, and
    gives the attention of exact math (float64) over what the cache then holds, float32 within 1e-5; one KV head
    per query head and two."""
    torch.manual_seed(3)
    B, Hkv, S, D, T, n = 2, 2, 48, 16, 5, 30  # n keys written before the step's T
    cache = Int8KVCache(B, S, Hkv, D, torch.float32)
    k, v = torch.randn(2, B, Hkv, n + T, D).unbind()
    cache.update(torch.arange(n), k[:, :, :n], v[:, :, :n])
    q = torch.randn(B, Hkv, n_rep * T, D)  # model.attention's layout: a KV head's query heads as rows
    positions = torch.arange(n, n + T)
    causal = torch.arange(S)[None, :] <= positions[:, None]
    tree = causal.clone()
    tree[3, n + 1:n + 3] = False  # a later token that sees the first new one but not the second and third
    for visible in (causal, tree):
        mask = visible[None, None].expand(B, 1, T, S)
        step = torch.compile(lambda q, k, v: cache.attend(q, k, v, positions, mask), fullgraph=True)
        torch._dynamo.reset()
        with unittest.mock.patch("llama_fast.quant.kv_cache.dequantize", side_effect=AssertionError("dequantized")):
            got = step(q, k[:, :, n:], v[:, :, n:])
        keys, values = (dequantize(x, s, torch.float64)
                        for x, s in ((cache.k_cache, cache.k_scale), (cache.v_cache, cache.v_scale)))
        scores = (q.double() @ keys.transpose(-1, -2) / D ** 0.5).masked_fill(~mask.repeat(1, 1, n_rep, 1),
                                                                              float("-inf"))
        torch.testing.assert_close(got, (scores.softmax(-1) @ values).float(), rtol=1e-5, atol=1e-5)


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


def test_kv_agreement_script_reports_what_the_two_caches_give(hf_checkpoint, load_cpu, sp_tokenizer, tmp_path):
    """scripts/kv_agreement.py (float32): its figures are those of generate()'s greedy tokens through the static
    float cache and the static int8 cache, computed here, for the same prompts: the serving engine's pools give
    what generate() gives."""
    import json
    import re
    import statistics
    import subprocess
    import sys

    _, d = hf_checkpoint("gqa")
    texts = ["Once upon a time there was", "The little dog ran to the", "A bird sat on the old tree and"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    proc = subprocess.run([sys.executable, "scripts/kv_agreement.py", "--checkpoint_path", str(d / "model.pth"),
                           "--prompt_file", str(tmp_path / "prompts.jsonl"), "--max_tokens", "40",
                           "--precision", "float32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    prompts = [sp_tokenizer.encode(t, bos=True) for t in texts]
    floats = [generate(load_cpu(d), [p], 40, GREEDY).tokens[0] for p in prompts]
    int8 = use_int8_kv_cache(load_cpu(d))
    quantized = [generate(int8, [p], 40, GREEDY).tokens[0] for p in prompts]
    firsts = [min(i for i in range(40) if a[i] != b[i]) for a, b in zip(floats, quantized) if a != b]
    same = sum(a[i] == b[i] for a, b in zip(floats, quantized) for i in range(40))
    assert firsts, "the prompts should show a difference (the checkpoint's weights are fixed)"
    numbers = re.fullmatch(r"(\d+) of 3 outputs of 40 tokens identical with an int8 KV cache; the others first "
                           r"differ at token (\S+) \(median; earliest (\S+)\); ([\d.]+)% of positions hold the same "
                           r"token\n", proc.stdout)
    assert numbers, proc.stdout
    figures = (3 - len(firsts), f"{statistics.median(firsts):g}", min(firsts), f"{100 * same / 120:.1f}")
    assert numbers.groups() == tuple(map(str, figures))
