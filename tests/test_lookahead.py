"""Lookahead decoding (lookahead.lookahead_generate): exact against plain decoding, with the model on --device.

References: plain generate() (greedy: token for token, on random and briefly trained models), no-cache forward passes
(the logits of every row of a step, and the KV cache after each step), a brute-force derivation of the attention
pattern, and the target's exact distribution over a tiny vocabulary (sampling: chi-square)."""
import json

import pytest
import torch
from conftest import english_ish
from helpers import (BASE, CONTEXT, GREEDY, SAMPLING, V, assert_ran_cleanly, chi_square_p_value, joint,
                     next_token_tables, run_cli)

import decoding
import generate
from llama_fast.checkpoint import load_model
from llama_fast.speculate.lookahead import (Lookahead, LookaheadConfig, NgramPool, accept, candidate_row, layout,
                                               lookahead_generate, tree_mask, window_row)
from llama_fast.speculate.speculative import speculative_generate
from model import Transformer
from model_config import ModelArgs
from sampling import SamplingConfig
from tokenizer import load_tokenizer
import train_small

CONFIGS = [LookaheadConfig(4, 3, 2), LookaheadConfig(2, 2, 1), LookaheadConfig(3, 4, 3), LookaheadConfig(1, 3, 1)]


@pytest.fixture(scope="module")
def target(hf_checkpoint, load_ours):
    return load_ours(hf_checkpoint("mha")[1])


@pytest.fixture(scope="module")
def trained(sp_tokenizer, device):
    """A model trained briefly on repetitive text, so that its greedy output repeats itself and the pool's guesses
    are accepted (a random model accepts almost nothing)."""
    data = torch.tensor(sp_tokenizer.encode(" ".join(english_ish(40, seed=3) * 6)))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=sp_tokenizer.vocab_size,
                                  max_seq_len=256))
    train_small.train(model, data, steps=150, seq_len=64, batch_size=8, lr=3e-3, log=lambda s: None)
    return model.eval().to(device)


def plain(model, prompt, n, eos_ids=()):
    return decoding.generate(model, [prompt], n, GREEDY, eos_ids).tokens[0]


# ------------------------------------------------------------------------------------------------ the layout

def predecessor(cfg, kind, a, b):
    """The token each token follows in its own sequence: a window token the one left of it on level 0 (level 0) or
    the one below it in its column; a candidate's token the one before it, its first token the last accepted one."""
    if kind == "window":
        level, col = a, b
        return None if level == col == 0 else ("window", 0, col - 1) if level == 0 else ("window", level - 1, col)
    g, j = a, b
    return ("window", 0, 0) if j == 0 else ("candidate", g, j - 1)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_layout_matches_a_brute_force_derivation(cfg):
    """Each row sees exactly the chain of its predecessors (walked one by one), sits at the chain's length, and the
    rows are the window's and the candidates' tokens, each once."""
    tree, offsets = layout(cfg)
    K, L = cfg.ngram - 1, cfg.length
    assert tree.shape == (L, L)
    tokens = [("window", lv, c) for lv in range(K) for c in range(cfg.window)]
    tokens += [("candidate", g, j) for g in range(cfg.guesses) for j in range(K)]
    rows = {t: (window_row(cfg, *t[1:]) if t[0] == "window" else candidate_row(cfg, *t[1:])) for t in tokens}
    assert sorted(rows.values()) == list(range(L))
    for t, row in rows.items():
        chain, at = [], t
        while at is not None:
            chain.append(rows[at])
            at = predecessor(cfg, *at)
        expected = torch.zeros(L, dtype=torch.bool)
        expected[chain] = True
        assert torch.equal(tree[row], expected), t
        assert offsets[row] == len(chain) - 1


def test_each_row_gives_the_logits_of_its_own_sequence(target):
    """One step's forward over a cached prefix: every row's logits equal a no-cache forward of prefix + the row's
    own sequence (its path through the tree), float32 within 1e-4; so positions, slots and mask are right."""
    cfg = LookaheadConfig(3, 3, 2)
    device = target.output.weight.device
    tree, offsets = layout(cfg)
    prefix = list(range(5, 25))
    tokens = [7 + (13 * i) % 300 for i in range(cfg.length)]
    P = len(prefix) - 1  # the last prefix token is row 0, not yet cached
    tokens[0] = prefix[-1]
    target.setup_caches(1, 64)
    target(torch.tensor([prefix[:-1]], device=device), torch.arange(P, device=device))
    start = torch.tensor([P], device=device)
    logits = target(torch.tensor([tokens], device=device), P + torch.arange(cfg.length, device=device),
                    mask=tree_mask(target, tree.to(device), offsets.to(device), start),
                    positions=start + offsets.to(device))[0]
    for row in range(cfg.length):
        seq = prefix[:-1] + [tokens[i] for i in torch.nonzero(tree[row])[:, 0].tolist()]
        with torch.no_grad():
            ref = target(torch.tensor([seq], device=device))[0, -1]
        assert (logits[row] - ref).abs().max().item() < 1e-4, row


def test_sliding_window_mask_counts_positions():
    """With a sliding window the mask keeps keys by position distance: a tree row at position t + 2 in slot t + 5 no
    longer sees the cached key at position t + 2 - window."""
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=16, max_seq_len=64,
                                  sliding_window=4))
    model.setup_caches(1, 32)
    cfg = LookaheadConfig(2, 3, 1)
    tree, offsets = layout(cfg)
    mask = tree_mask(model, tree, offsets, torch.tensor([10]))[0]
    key_pos = torch.cat([torch.arange(10), 10 + offsets, torch.arange(10 + cfg.length, 32)])
    for row in range(cfg.length):
        pos = 10 + offsets[row]
        expected = torch.zeros(32, dtype=torch.bool)
        expected[:10] = key_pos[:10] > pos - 4
        expected[10 : 10 + cfg.length] = tree[row] & (key_pos[10 : 10 + cfg.length] > pos - 4)
        assert torch.equal(mask[row], expected)


# ---------------------------------------------------------------------------------------------- host side

def test_ngram_pool_keeps_the_most_recent_continuations():
    pool = NgramPool(3, 2)
    pool.add_text([1, 2, 3, 1, 2, 4])
    assert pool.get(1) == [(2, 3), (2, 4)]
    assert pool.get(2) == [(3, 1)] and pool.get(3) == [(1, 2)]
    pool.add([1, 2, 3])  # seen again: moves last
    assert pool.get(1) == [(2, 4), (2, 3)]
    pool.add([1, 5, 5])  # a third: the oldest goes
    assert pool.get(1) == [(2, 3), (5, 5)]
    pool.add_text([9, 9, 7, 8, 6], last=1)  # only the n-grams ending in the last token
    assert pool.get(7) == [(8, 6)] and pool.get(9) == []


def test_accept_follows_the_candidate_that_carries_on():
    cfg = LookaheadConfig(window=1, ngram=4, guesses=3)
    candidates = [(5, 6, 7), (5, 8, 1), (2, 2, 2)]
    outs = [0] * cfg.length
    outs[0] = 5  # the token after the last accepted one: candidates 0 and 1 carry on
    outs[candidate_row(cfg, 0, 0)], outs[candidate_row(cfg, 1, 0)] = 6, 6  # after 5: 6, only candidate 0 has it
    outs[candidate_row(cfg, 0, 1)] = 9  # after 5 6: 9, not 7
    assert accept(outs, candidates, cfg) == ([5, 6, 9], 0)
    outs[0] = 3
    assert accept(outs, candidates, cfg) == ([3], None)
    outs[0], outs[candidate_row(cfg, 2, 0)], outs[candidate_row(cfg, 2, 1)] = 2, 2, 2
    outs[candidate_row(cfg, 2, 2)] = 4  # all of candidate 2, then the bonus token
    assert accept(outs, candidates, cfg) == ([2, 2, 2, 4], 2)


# ------------------------------------------------------------------------------------------------ greedy

@pytest.mark.parametrize("cfg", CONFIGS)
def test_greedy_is_plain_greedy_on_a_random_model(target, prompt_ids, cfg):
    for seed in range(3):
        prompt = prompt_ids(20, seed=seed)
        ref = plain(target, prompt, 40)
        res = lookahead_generate(target, [prompt], 40, GREEDY, lookahead=cfg)
        assert res.tokens[0] == ref
        assert len(res.accepted) + sum(res.accepted) >= len(ref) - 1


@pytest.mark.parametrize("cfg", CONFIGS)
def test_greedy_is_plain_greedy_on_a_trained_model(trained, sp_tokenizer, cfg):
    """A trained model repeats itself: steps accept candidates (from the prompt and from the Jacobi trajectories)."""
    accepted = []
    for seed in range(3):
        prompt = sp_tokenizer.encode(" ".join(english_ish(2, seed=seed)))
        ref = plain(trained, prompt, 60)
        res = lookahead_generate(trained, [prompt], 60, GREEDY, lookahead=cfg)
        assert res.tokens[0] == ref
        accepted += res.accepted
    assert 0 in accepted and max(accepted) == cfg.ngram - 1  # steps that accept nothing, and whole candidates


def test_a_lookahead_proposer_used_twice_counts_each_run(trained, sp_tokenizer):
    """speculative_generate with one Lookahead object twice on the same prompt: the same tokens, acceptances and
    pool hits each time (its state is set up per run by start())."""
    prompt = sp_tokenizer.encode(" ".join(english_ish(2, seed=2)))
    proposer = Lookahead(LookaheadConfig(3, 3, 2))
    runs = [speculative_generate(trained, [prompt], 40, GREEDY, proposer=proposer, speculate_k=2) for _ in range(2)]
    assert runs[0].pool_hits > 0
    assert [(r.tokens, r.accepted, r.pool_hits) for r in runs[1:]] == [(runs[0].tokens, runs[0].accepted,
                                                                       runs[0].pool_hits)]
    assert runs[0].tokens[0] == plain(trained, prompt, 40)


def test_kv_cache_after_each_step_equals_a_forward_over_the_accepted_tokens(trained, sp_tokenizer):
    cfg = LookaheadConfig(3, 4, 3)
    model, device = trained, trained.output.weight.device
    prompt = sp_tokenizer.encode(" ".join(english_ish(2, seed=1)))
    model.setup_caches(1, 200)
    first = decoding.prefill(model, torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device),
                             None, GREEDY, None, None).item()
    state, seq = Lookahead(cfg), prompt + [first]
    state.start(model, prompt, 200, GREEDY, decoding.Steps())
    state.accepted([first], 0)
    reference = Transformer(model.config).to(device)
    reference.load_state_dict(model.state_dict())
    moved = 0
    for _ in range(30):  # 20 steps moved only 5 tokens on an AVX2 CPU: its float32 sums differ, so do the guesses
        new, n = state.step(model, torch.tensor([[seq[-1]]], device=device), len(seq) - 1, cfg.ngram - 1, GREEDY,
                            decoding.Steps())
        state.accepted(new, n)
        seq += new
        moved += n
        reference.setup_caches(1, 200)
        with torch.no_grad():
            reference(torch.tensor([seq[:-1]], device=device), torch.arange(len(seq) - 1, device=device))
        for ours, ref in zip(model.layers, reference.layers):
            for name in ("k_cache", "v_cache"):
                got = getattr(ours.attention.kv_cache, name)[:, :, : len(seq) - 1]
                want = getattr(ref.attention.kv_cache, name)[:, :, : len(seq) - 1]
                assert (got - want).abs().max().item() < 1e-5
    assert moved > 5  # accepted candidates' keys and values were moved, not only single tokens written


def test_stops_at_eos_like_plain_greedy(trained, sp_tokenizer):
    for seed in range(3):
        prompt = sp_tokenizer.encode(" ".join(english_ish(2, seed=seed)))
        row = plain(trained, prompt, 60)
        eos, j = next((t, j) for j, t in enumerate(row) if j >= 10 and t not in row[:j])
        ref = decoding.generate(trained, [prompt], 60, GREEDY, [eos])
        res = lookahead_generate(trained, [prompt], 60, GREEDY, [eos], lookahead=LookaheadConfig(3, 4, 3))
        assert res.tokens == ref.tokens and len(res.tokens[0]) == j + 1 and res.stopped == [True]


def test_end_of_the_cache_falls_back_to_plain_steps(hf_checkpoint, load_ours, prompt_ids):
    short = load_ours(hf_checkpoint("short_context", max_position_embeddings=32)[1])
    prompt = prompt_ids(14, seed=3)
    ref = plain(short, prompt, 40)
    assert len(ref) == 32 - 14
    cfg = LookaheadConfig(2, 3, 1)  # 6 tokens a step: the last steps have no room in the 32-slot cache
    res = lookahead_generate(short, [prompt], 40, GREEDY, lookahead=cfg)
    assert res.tokens[0] == ref
    assert len(res.accepted) + sum(res.accepted) < len(ref) - 1  # some tokens came from plain decode steps


# ------------------------------------------------------------------------------------------------ sampling

@pytest.fixture(scope="module")
def tiny_vocab(hf_checkpoint, load_ours):
    return load_ours(hf_checkpoint("tiny_vocab", vocab_size=V)[1])


def test_sampled_generation_follows_the_target(tiny_vocab):
    """600 generations of 3 tokens over 8 tokens (the first from prefill, the others from lookahead steps whose
    candidates come from the repetitive prompt): (first, second) and the third token follow the target's exact
    distributions (chi-square, p > 0.001 each), and candidates were accepted along the way."""
    truth = joint(next_token_tables(tiny_vocab, 3))
    torch.manual_seed(1)
    counts, accepted = torch.zeros(V, V, V), []
    for _ in range(600):
        res = lookahead_generate(tiny_vocab, [CONTEXT], 3, SAMPLING, lookahead=LookaheadConfig(2, 3, 3))
        counts[tuple(res.tokens[0])] += 1
        accepted += res.accepted
    assert 0 in accepted and max(accepted) >= 1
    assert chi_square_p_value(counts.sum(2), truth.sum(2)) > 1e-3
    assert chi_square_p_value(counts.sum((0, 1)), truth.sum((0, 1))) > 1e-3


def test_python_api_refuses_batches_and_penalties(target):
    with pytest.raises(ValueError, match="lookahead decoding needs batch size 1"):
        lookahead_generate(target, [[1, 2, 3], [4, 5, 6]], 4, GREEDY)
    with pytest.raises(ValueError, match="penalties"):
        lookahead_generate(target, [[1, 2, 3]], 4, SamplingConfig(presence_penalty=0.5))
    with pytest.raises(ValueError, match="ngram must be >= 2"):
        LookaheadConfig(4, 1, 2)


# ------------------------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def int4_checkpoint(quantized_copy):
    return quantized_copy("mha", "--mode", "int4", "--groupsize", "32") / "model_int4.g32.pth"


def test_cli_compiled_with_an_int4_checkpoint(int4_checkpoint, tmp_path):
    """generate.py --compile --lookahead on an int4 checkpoint prints plain greedy decoding's text, twice (the
    compiled step reused), and reports tokens per step in --metrics_json."""
    tok = load_tokenizer(int4_checkpoint.parent / "tokenizer.model")
    text = "A king and a queen sing; a king and a queen"
    model = load_model(int4_checkpoint, "cpu", torch.float32)
    row = decoding.generate(model, [tok.encode(text)], 16, GREEDY, tok.eos_ids).tokens[0]
    metrics = tmp_path / "m.json"
    proc = run_cli("--checkpoint_path", int4_checkpoint, "--prompt", text, *BASE, "--num_samples", "2", "--compile",
                   "--lookahead", "3", "--lookahead_ngram", "3", "--lookahead_guesses", "2", "--metrics_json", metrics)
    assert_ran_cleanly(proc)
    assert "Compilation time" in proc.stderr and "tokens per step" in proc.stderr
    assert proc.stdout == (text + tok.decode([t for t in row if t not in tok.eos_ids]) + "\n") * 2
    m = json.loads(metrics.read_text())
    la = m["lookahead"]
    assert (la["window"], la["ngram"], la["guesses"]) == (3, 3, 2)
    assert sum(la["tokens_per_step_histogram"]) == la["lookahead_steps"] > 0 and la["tokens_per_step"] >= 1
    for s in m["samples"]:
        assert s["new_tokens"] == [len(row)] and sum(s["accepted"]) + len(s["accepted"]) >= len(row) - 1


MISTAKES = {  # arguments -> text of the error line
    ("--lookahead", "--prompt_lookup", "2"): "choose one of --lookahead",
    ("--lookahead", "--prompt", "a", "--prompt", "b"): "lookahead decoding needs batch size 1",
    ("--lookahead", "--repetition_penalty", "1.2"): "penalties",
    ("--lookahead", "--interactive"): "interactive",
    ("--lookahead_ngram", "3"): "needs --lookahead",
    ("--lookahead", "-2"): "lookahead window must be >= 1",
    ("--lookahead", "--lookahead_ngram", "1"): "lookahead ngram must be >= 2",
    ("--lookahead", "--lookahead_guesses", "0"): "lookahead guesses must be >= 1",
}


@pytest.mark.parametrize("args", list(MISTAKES))
def test_cli_mistakes_exit_with_one_error_line(int4_checkpoint, capsys, args):
    with pytest.raises(SystemExit) as exit_:
        generate.main(list(map(str, ["--checkpoint_path", int4_checkpoint, *BASE, *args])))
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert MISTAKES[args] in message
    assert capsys.readouterr().err == ""
