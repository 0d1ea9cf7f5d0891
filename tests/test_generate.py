"""decoding.py and sampling.py: compiled vs eager decoding, batched generation with per-row EOS, sampling and
penalties, with our model and the sampling maths on --device.

References (on CPU): transformers' LlamaForCausalLM (greedy generate, repetition penalty, plain forward passes) and
the sampling/penalty formulas written out independently here in float64."""
import itertools
import math

import pytest
import torch
from conftest import hf_greedy, on_cpu
from torch._dynamo.utils import counters

import decoding
from llama_fast import checkpoint
from llama_fast.cpu.layers import CpuKVCache
from model import KVCache
from sampling import SamplingConfig, apply_penalties, logits_to_probs, sample

GREEDY = SamplingConfig(temperature=0)
N_NEW = 32
BATCH_LENGTHS = (23, 40, 9)  # three different lengths: rows are left-padded by 17, 0 and 31


@pytest.fixture(scope="module")
def mha(hf_checkpoint, load_ours):
    hf, d = hf_checkpoint("mha")
    return hf, load_ours(d)


@pytest.fixture(scope="module")
def gqa(hf_checkpoint, load_ours):
    hf, d = hf_checkpoint("gqa")
    return hf, load_ours(d)


@pytest.fixture(scope="module")
def compiled_steps(device):
    """One set of compiled steps for the module; torch.compile recompiles per model/shape as needed."""
    torch._dynamo.reset()
    yield decoding.make_steps(device, compile=True)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def batch_prompts(prompt_ids):
    return [prompt_ids(n, seed=20 + n) for n in BATCH_LENGTHS]


def gen(model, prompts, n=N_NEW, sampling=GREEDY, eos_ids=(), **kw):
    return decoding.generate(model, prompts, n, sampling, eos_ids, **kw)


# ------------------------------------------------------------------------------------- compiled decoding


def test_compiled_greedy_equals_eager(mha, compiled_steps, prompt_ids):
    hf, ours = mha
    prompt = prompt_ids(37, seed=7)
    eager = gen(ours, [prompt]).tokens
    graphs = counters["stats"]["unique_graphs"]
    compiled = gen(ours, [prompt], steps=compiled_steps).tokens
    assert counters["stats"]["unique_graphs"] > graphs  # the decode step really went through torch.compile
    assert compiled == eager == hf_greedy(hf, [prompt], N_NEW)
    # a prompt of another length (so another KV cache size, which torch.compile handles by recompiling)
    other = prompt_ids(12, seed=8)
    assert gen(ours, [other], steps=compiled_steps).tokens == gen(ours, [other]).tokens


def test_compiled_prefill_equals_eager(mha, batch_prompts, device):
    """--compile_prefill: prefill compiled with dynamic shapes gives the same greedy tokens for prompts of several
    lengths (one batch left-padded, then single prompts) without a recompile per length."""
    _, ours = mha
    torch._dynamo.reset()
    steps = decoding.make_steps(device, compile=True, compile_prefill=True)
    try:
        assert gen(ours, batch_prompts, steps=steps).tokens == gen(ours, batch_prompts).tokens
        for p in batch_prompts:
            assert gen(ours, [p], steps=steps).tokens == gen(ours, [p]).tokens
    finally:
        torch._dynamo.reset()


def test_float16_and_bfloat16_follow_float32(hf_checkpoint, device):
    """Reduced precisions run the same model: their logits stay close to float32's (relative to the logits' scale)."""
    _, d = hf_checkpoint("gqa")
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0)).to(device)
    ref = checkpoint.load_model(d / "model.pth", device, torch.float32)(x)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 5e-2)):  # ~ a few ulps of each format, summed over layers
        out = checkpoint.load_model(d / "model.pth", device, dtype)(x)
        assert ((out - ref).norm() / ref.norm()).item() < tol, dtype


# ------------------------------------------------------------------------------------- batched generation


def first_hits(rows, eos):
    return [next((j for j, t in enumerate(r) if t in eos), None) for r in rows]


def pick_eos(rows, all_rows_stop: bool):
    """EOS ids such that the rows first produce one at pairwise different steps (>= 1); with all_rows_stop every
    row does (as early as possible, so that the loop ends early), otherwise the last row never does. Searched
    among the ids that the rows generate."""
    candidates = sorted(set(itertools.chain(*rows)))
    for size in (1, 2, 3):
        found = []
        for eos in itertools.combinations(candidates, size):
            hits = first_hits(rows, eos)
            stopping = hits if all_rows_stop else hits[:-1]
            if None in stopping or min(stopping) < 1 or len(set(stopping)) != len(stopping):
                continue
            if all_rows_stop or hits[-1] is None:
                found.append((max(stopping), list(eos), hits))
        if found:
            _, eos, hits = min(found)
            return eos, hits
    raise AssertionError(f"no EOS choice gives distinct stopping steps for {rows}")


@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_batch_equals_each_prompt_alone(which, mha, gqa, batch_prompts):
    hf, ours = {"mha": mha, "gqa": gqa}[which]
    alone = [gen(ours, [p]).tokens[0] for p in batch_prompts]
    assert alone == hf_greedy(hf, batch_prompts, N_NEW)
    batch = gen(ours, batch_prompts)
    assert batch.tokens == alone
    assert batch.prompt_tokens == list(BATCH_LENGTHS) and batch.stopped == [False] * 3


def check_batch_eos(model, prompts, alone, all_rows_stop, steps=decoding.Steps()):
    eos, hits = pick_eos(alone, all_rows_stop)
    res = gen(model, prompts, eos_ids=eos, steps=steps)
    for row, solo, hit in zip(res.tokens, alone, hits):
        if hit is None:  # never produced an EOS: ran to max_new_tokens
            assert row == solo and len(row) == N_NEW
        else:  # stopped at its own EOS, which is its last token
            assert row == solo[:hit + 1] and row[-1] in eos and not set(row[:-1]) & set(eos)
    assert res.stopped == [h is not None for h in hits]
    if all_rows_stop:  # the loop ends once every row has stopped; `done` is checked every 8 steps
        assert max(hits) <= res.decode_tokens <= min(max(hits) + 7, N_NEW - 1)
    else:
        assert res.decode_tokens == N_NEW - 1
    return hits


@pytest.mark.parametrize("all_rows_stop", [False, True])
def test_batch_rows_stop_at_their_own_eos(mha, batch_prompts, all_rows_stop):
    _, ours = mha
    alone = [gen(ours, [p]).tokens[0] for p in batch_prompts]
    hits = check_batch_eos(ours, batch_prompts, alone, all_rows_stop)
    assert len({h for h in hits if h is not None}) >= 2
    if all_rows_stop:
        assert max(hits) + 7 < N_NEW - 1  # so the early end of the loop was really checked


def test_batch_gqa_compiled_equals_alone_and_stops_at_eos(gqa, compiled_steps, batch_prompts):
    hf, ours = gqa
    alone = hf_greedy(hf, batch_prompts, N_NEW)
    assert gen(ours, batch_prompts, steps=compiled_steps).tokens == alone
    check_batch_eos(ours, batch_prompts, alone, all_rows_stop=False, steps=compiled_steps)


def test_compiled_mha_decode_step_equals_sdpa(mha, batch_prompts, device):
    """On CPU, a compiled one-token step of a model with one query head per KV head attends through
    CpuKVCache's attend_one, not SDPA (measured faster there): its logits equal the eager step's (SDPA) in float32, for a
    left-padded batch at several positions, and the batch's greedy tokens equal transformers' for each prompt
    alone."""
    hf, ours = mha
    assert ours.config.n_heads == ours.config.n_kv_heads
    assert ours.kv_cache_class is (CpuKVCache if on_cpu(device) else KVCache)  # what loading swapped in
    step = decoding.compile_static(lambda m, tok, pos, pad: m(tok, pos, pad), device)
    batch = decoding.Batch.of(batch_prompts, ours.config.vocab_size, False, device)
    T = batch.tokens.shape[1]
    ours.setup_caches(len(batch_prompts), T + 8)
    with torch.inference_mode():
        ours(batch.tokens, torch.arange(T, device=device), batch.left_pad)
        for i in range(8):
            token = torch.tensor([[3 + i]] * len(batch_prompts), device=device)
            pos = torch.tensor([T + i], device=device)
            compiled = step(ours, token, pos, batch.left_pad)
            eager = ours(token, pos, batch.left_pad)  # rewrites the same cache slot with the same keys and values
            torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    compiled_steps = decoding.make_steps(device, compile=True)
    assert gen(ours, batch_prompts, steps=compiled_steps).tokens == hf_greedy(hf, batch_prompts, N_NEW)


def test_equal_length_batch_and_repeated_prompt(mha, prompt_ids):
    """Without padding (all rows the same length) rows are still independent, including identical rows."""
    _, ours = mha
    a, b = prompt_ids(20, seed=30), prompt_ids(20, seed=31)
    res = gen(ours, [a, b, a])
    assert res.tokens == [gen(ours, [a]).tokens[0], gen(ours, [b]).tokens[0], gen(ours, [a]).tokens[0]]


def test_continuing_from_start_pos_equals_one_long_prompt(mha, prompt_ids):
    """The chat path: a second turn prefilled into the existing KV cache after the first reply."""
    _, ours = mha
    first, second = prompt_ids(25, seed=40), prompt_ids(15, seed=41)[1:]
    reply = gen(ours, [first], 10, cache_len=200).tokens[0]
    # the reply's last token was sampled but not yet written to the cache: it starts the next turn
    pos = len(first) + len(reply) - 1
    cont = gen(ours, [[reply[-1]] + second], 12, start_pos=pos).tokens[0]
    assert cont == gen(ours, [first + reply + second], 12).tokens[0]


def test_on_token_streams_every_token(mha, batch_prompts):
    _, ours = mha
    seen = []
    res = gen(ours, batch_prompts, 10, on_token=lambda step, tok: seen.append((step, tok[:, 0].tolist())))
    assert [s for s, _ in seen] == list(range(10))
    assert [list(col) for col in zip(*[t for _, t in seen])] == res.tokens


def test_prompt_must_fit_the_context(mha, prompt_ids):
    _, ours = mha
    context = ours.config.max_seq_len
    long = (prompt_ids(60, seed=50) * 5)[:context]
    with pytest.raises(ValueError):
        gen(ours, [long])
    with pytest.raises(ValueError):
        gen(ours, [[]])
    # max_new_tokens is cut to what fits
    res = gen(ours, [long[:context - 5]], 50)
    assert len(res.tokens[0]) == 5


# ----------------------------------------------------------------------------------------- sampling maths


def _pipeline(logits, steps, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Independent float64 reference applying the steps in the given order to each row's distribution,
    renormalising after each: temperature (p ** (1/T), i.e. logits / T), top-k (the k most likely tokens), top-p
    (the smallest set of most likely tokens whose mass reaches top_p), min-p (keep p >= min_p * p_max)."""
    out = []
    for row in logits.double():
        p = row.softmax(-1)
        for step in steps:
            if step == "temperature":
                p = torch.where(p > 0, (row / temperature - (row / temperature).max()).exp(), 0.0)
            elif step == "top_k" and top_k:
                p[p.argsort(descending=True)[top_k:]] = 0.0
            elif step == "top_p" and top_p < 1.0:
                total, chosen = 0.0, []
                for i in p.argsort(descending=True).tolist():
                    chosen.append(i)
                    total += p[i].item()
                    if total >= top_p:
                        break
                p = torch.zeros_like(p).index_copy(0, torch.tensor(chosen), p[chosen])
            elif step == "min_p" and min_p > 0:
                p = torch.where(p >= min_p * p.max(), p, 0.0)
            p = p / p.sum()
        out.append(p)
    return torch.stack(out)


ORDER = ("temperature", "top_k", "top_p", "min_p")


def ref_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return _pipeline(logits, ORDER, temperature, top_k, top_p, min_p)


def random_logits(seed, rows=4, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2


@pytest.mark.parametrize("k", [1, 2, 7, 49, 50, 80])
def test_top_k_keeps_exactly_the_k_largest(k, device):
    logits = random_logits(1)
    probs = logits_to_probs(logits.to(device), SamplingConfig(temperature=1.0, top_k=k)).cpu()
    for row, p in zip(logits, probs):
        kept = set(torch.nonzero(p).flatten().tolist())
        assert kept == set(row.topk(min(k, 50)).indices.tolist())
    torch.testing.assert_close(probs.double(), ref_probs(logits, top_k=k), rtol=0, atol=1e-6)


def test_top_p_keeps_the_minimal_prefix(device):
    logits = random_logits(2, rows=6)
    for row in logits:
        cum = row.double().softmax(-1).sort(descending=True).values.cumsum(0)
        for n in (1, 2, 5, 20):  # p strictly between two cumulative masses: exactly n tokens are needed
            p = float(((cum[n - 2] if n > 1 else 0.0) + cum[n - 1]) / 2)
            probs = logits_to_probs(row[None].to(device), SamplingConfig(temperature=1.0, top_k=0, top_p=p))[0].cpu()
            assert set(torch.nonzero(probs).flatten().tolist()) == set(row.topk(n).indices.tolist()), (n, p)
            torch.testing.assert_close(probs.double(), ref_probs(row[None], top_p=p)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_p, n_kept", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4), (0.2499, 1), (0.2501, 2),
                                           (0.5001, 3), (0.7501, 4)])
def test_top_p_boundaries(top_p, n_kept, device):
    """Four equal logits give probabilities of exactly 0.25 each (1 / 4 in binary floating point): when the
    mass of the first n tokens equals top_p exactly, those n suffice."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, -math.inf, -math.inf]])
    probs = logits_to_probs(logits.to(device), SamplingConfig(temperature=1.0, top_k=0, top_p=top_p))[0].cpu()
    assert int((probs > 0).sum()) == n_kept
    assert torch.equal(probs[probs > 0], torch.full((n_kept,), 1.0 / n_kept))
    assert probs[4:].sum() == 0


def test_top_p_tiny_keeps_the_most_likely_token(device):
    logits = random_logits(3)
    probs = logits_to_probs(logits.to(device), SamplingConfig(temperature=1.0, top_k=0, top_p=1e-9)).cpu()
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.9])
def test_min_p_keeps_tokens_above_a_fraction_of_the_max(min_p, device):
    logits = random_logits(4)
    probs = logits_to_probs(logits.to(device), SamplingConfig(temperature=1.0, top_k=0, min_p=min_p)).cpu()
    full = logits.double().softmax(-1)
    for p, q in zip(probs, full):
        assert set(torch.nonzero(p).flatten().tolist()) == set(torch.nonzero(q >= min_p * q.max()).flatten().tolist())
    torch.testing.assert_close(probs.double(), ref_probs(logits, min_p=min_p), rtol=0, atol=1e-6)
    # ties with the maximum are always kept
    eq = logits_to_probs(torch.zeros(1, 5, device=device), SamplingConfig(temperature=1.0, top_k=0, min_p=0.99)).cpu()
    assert torch.equal(eq, torch.full((1, 5), 0.2))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_logits(temperature, device):
    logits = random_logits(5)
    probs = logits_to_probs(logits.to(device), SamplingConfig(temperature=temperature, top_k=0)).cpu()
    torch.testing.assert_close(probs.double(), (logits.double() / temperature).softmax(-1), rtol=0, atol=1e-6)


def _commuted(order):
    """top_k commutes with temperature (which keeps the ranking) and with min_p (both keep a most-likely prefix,
    chosen independently of normalisation): move top_k as early as those swaps allow."""
    order = list(order)
    for _ in order:
        for i in range(1, len(order)):
            if order[i] == "top_k" and order[i - 1] in ("temperature", "min_p"):
                order[i - 1], order[i] = order[i], order[i - 1]
    return tuple(order)


def test_combined_order_temperature_top_k_top_p_min_p(device):
    logits = torch.tensor([[-1.1, 1.6, -0.9, -1.9, -0.0, 2.1, 4.0, 1.5, -0.4, 0.2],
                           [0.4, 1.7, 4.0, 1.9, 0.8, 0.8, 0.3, -1.2, -2.9, 0.2]])
    settings = dict(temperature=2.3, top_k=5, top_p=0.66, min_p=0.32)
    probs = logits_to_probs(logits.to(device), SamplingConfig(**settings)).cpu().double()
    torch.testing.assert_close(probs, ref_probs(logits, **settings), rtol=0, atol=1e-6)
    # The example discriminates: every order of the four steps that is not equivalent gives other probabilities.
    for order in itertools.permutations(ORDER):
        diff = (_pipeline(logits, order, **settings) - probs).abs().max().item()
        if _commuted(order) == _commuted(ORDER):
            assert diff < 1e-6, order
        else:
            assert diff > 0.05, order


def test_greedy_sample_is_argmax(device):
    logits = random_logits(6, rows=8)
    assert torch.equal(sample(logits.to(device), GREEDY).cpu(), logits.argmax(-1, keepdim=True))
    assert sample(logits.to(device), GREEDY).shape == (8, 1)


@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_k=0), dict(temperature=0.7, top_k=5, top_p=0.9),
                                      dict(temperature=1.3, top_k=0, min_p=0.1)])
def test_sample_frequencies_match_probabilities(settings, device):
    cfg = SamplingConfig(**settings)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.7, 0.2, 0.0, -0.5, -1.0, -2.0, -4.0]])
    p = logits_to_probs(logits, cfg)[0].double()
    n = 200_000
    torch.manual_seed(0)
    draws = sample(logits.expand(n, -1).contiguous().to(device), cfg)[:, 0].cpu()
    freq = torch.bincount(draws, minlength=10).double() / n
    # each count is Binomial(n, p): 5 standard deviations (two-sided chance of exceeding ~6e-7 per token)
    bound = 5 * torch.sqrt(p * (1 - p) / n) + 1e-12
    assert ((freq - p).abs() <= bound).all(), (freq, p)
    assert (freq[p == 0] == 0).all()  # truncated tokens are never drawn


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=-1e-9), dict(top_k=-1), dict(top_p=0),
                                 dict(top_p=-0.5), dict(top_p=1.01), dict(min_p=1.0), dict(min_p=1.5),
                                 dict(min_p=-0.1), dict(repetition_penalty=0), dict(repetition_penalty=-1)])
def test_sampling_config_rejects_invalid_values(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_sampling_config_accepts_edge_values():
    SamplingConfig(temperature=0, top_k=0, top_p=1.0, min_p=0.0)
    SamplingConfig(top_p=1e-6, min_p=0.999, repetition_penalty=0.5, frequency_penalty=-1, presence_penalty=-1)
    assert SamplingConfig(temperature=0).greedy and not SamplingConfig(temperature=0.1).greedy


# ----------------------------------------------------------------------------------------------- penalties


def test_repetition_penalty_formula(device):
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0, 4.0], [1.0, 1.0, -1.0, -1.0, 2.0, -2.0]])
    seen = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    counts = torch.zeros(2, 6)
    logits, seen, counts = logits.to(device), seen.to(device), counts.to(device)
    got = apply_penalties(logits, SamplingConfig(repetition_penalty=2.0), seen, counts).cpu()
    expected = [[2.0 / 2, -1.0 * 2, 0.5, -3.0, 0.0, 4.0], [1.0, 1.0 / 2, -1.0, -1.0 * 2, 2.0 / 2, -2.0 * 2]]
    assert torch.equal(got, torch.tensor(expected))
    # a penalty below 1 rewards seen tokens the same way round
    got = apply_penalties(logits, SamplingConfig(repetition_penalty=0.5), seen, counts).cpu()
    assert torch.equal(got[0], torch.tensor([4.0, -0.5, 0.5, -3.0, 0.0, 4.0]))


def test_frequency_and_presence_penalty_formulas(device):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 20, generator=g)
    counts = torch.randint(0, 4, (3, 20), generator=g).float()
    seen = (counts > 0) | (torch.rand(3, 20, generator=g) < 0.3)  # prompt tokens are seen but not counted
    on = [t.to(device) for t in (seen, counts)]
    freq = apply_penalties(logits.to(device), SamplingConfig(frequency_penalty=0.7), *on).cpu()
    pres = apply_penalties(logits.to(device), SamplingConfig(presence_penalty=1.3), *on).cpu()
    both = apply_penalties(logits.to(device), SamplingConfig(repetition_penalty=1.5, frequency_penalty=0.7,
                                                             presence_penalty=1.3), *on).cpu()
    for b in range(3):
        for v in range(20):
            x, c = logits[b, v].item(), counts[b, v].item()
            assert freq[b, v].item() == pytest.approx(x - 0.7 * c, abs=1e-6)
            assert pres[b, v].item() == pytest.approx(x - (1.3 if c > 0 else 0.0), abs=1e-6)
            r = (x / 1.5 if x > 0 else x * 1.5) if seen[b, v] else x
            assert both[b, v].item() == pytest.approx(r - 0.7 * c - (1.3 if c > 0 else 0.0), abs=1e-6)


def test_greedy_repetition_penalty_matches_hf(mha, prompt_ids):
    hf, ours = mha
    prompt = prompt_ids(30, seed=60)
    saved = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 30, dtype=torch.long),
                              do_sample=False, max_new_tokens=24, repetition_penalty=1.8, pad_token_id=0)
    finally:
        hf.generation_config.eos_token_id = saved
    got = gen(ours, [prompt], 24, SamplingConfig(temperature=0, repetition_penalty=1.8))
    assert got.tokens[0] == ref[0, 30:].tolist()
    assert got.tokens[0] != gen(ours, [prompt], 24).tokens[0]  # the penalty mattered


def reference_penalized_greedy(hf, prompt, n, rep, freq, pres):
    """Greedy decoding with full forward passes of the HF model and the penalty formulas applied by hand."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, -1].double()
        for v in set(seq):
            logits[v] = logits[v] / rep if logits[v] > 0 else logits[v] * rep
        for v in set(out):
            logits[v] -= freq * out.count(v) + pres
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def test_penalized_greedy_batch_matches_reference(mha, prompt_ids):
    hf, ours = mha
    cfg = SamplingConfig(temperature=0, repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.3)
    # the middle row contains id 0, which is also the padding id: there it counts as seen, in padding it must not
    prompts = [prompt_ids(18, seed=70), prompt_ids(9, seed=71)[:5] + [0] + prompt_ids(9, seed=71)[5:],
               prompt_ids(6, seed=72)]
    refs = [reference_penalized_greedy(hf, p, 20, 1.2, 0.4, 0.3) for p in prompts]
    assert gen(ours, prompts, 20, cfg).tokens == refs
    assert [gen(ours, [p], 20, cfg).tokens[0] for p in prompts] == refs
    assert refs != [gen(ours, [p], 20).tokens[0] for p in prompts]  # the penalties mattered


def test_huge_penalties_prevent_repeats(mha, prompt_ids):
    _, ours = mha
    prompt = prompt_ids(20, seed=80)
    plain = gen(ours, [prompt], 40).tokens[0]
    assert len(set(plain)) < len(plain)  # without penalties this random model repeats itself
    assert set(plain) & set(prompt)
    for kw in (dict(presence_penalty=1e4), dict(frequency_penalty=1e4)):
        out = gen(ours, [prompt], 40, SamplingConfig(temperature=0, **kw)).tokens[0]
        assert len(set(out)) == len(out), kw  # no output token twice (prompt tokens are not penalised)
    out = gen(ours, [prompt], 40, SamplingConfig(temperature=0, repetition_penalty=1e6)).tokens[0]
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
    # negative penalties reward repetition: the output collapses onto few tokens
    out = gen(ours, [prompt], 40, SamplingConfig(temperature=0, presence_penalty=-1e3)).tokens[0]
    assert len(set(out)) == 1


# ------------------------------------------------------------------------------------------- seeds


def test_same_seed_same_tokens_different_seed_different(mha, batch_prompts):
    _, ours = mha
    cfg = SamplingConfig(temperature=1.0, top_k=0)

    def run(seed):
        torch.manual_seed(seed)
        return gen(ours, batch_prompts, N_NEW, cfg).tokens

    a = run(1234)
    assert run(1234) == a
    assert run(4321) != a
    assert a != gen(ours, batch_prompts).tokens  # really sampled, not greedy
