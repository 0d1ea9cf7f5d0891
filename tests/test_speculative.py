"""Speculative decoding (speculative.speculative_generate): draft-model and prompt-lookup proposals are exact, with
the models on --device (the command-line tests run on CPU).

References: plain generate() of the target (greedy: token for token), the acceptance counts predicted from
no-cache forward passes over the final sequence (so both KV caches are checked, not only the output), and the
target's exact joint distribution over a tiny vocabulary (sampling: chi-square tests at fixed seeds)."""
import copy
import json

import pytest
import torch
from helpers import (BASE, CONTEXT, GREEDY, SAMPLING, V, assert_ran_cleanly, chi_square_p_value, joint,
                     next_token_tables, run_cli)

import decoding
import generate
from llama_fast.speculate.speculative import (DraftModel, PromptLookup, accept_draft, acceptance_stats,
                                              speculative_generate)
from sampling import SamplingConfig
from tokenizer import load_tokenizer

N_NEW = 40


@pytest.fixture(scope="module")
def target(hf_checkpoint, load_ours):
    return load_ours(hf_checkpoint("mha")[1])


@pytest.fixture(scope="module")
def cpu_target(hf_checkpoint, load_cpu):
    """The target on CPU, where the command line runs (--device cpu)."""
    return load_cpu(hf_checkpoint("mha")[1])


@pytest.fixture(scope="module")
def drafts(hf_checkpoint, load_ours, target):
    """Drafts sharing the target's 400-token vocabulary: an exact copy (accepts everything), the target's first
    layer alone (accepts some) and a smaller unrelated random model (accepts almost nothing)."""
    shallow = copy.deepcopy(target)
    del shallow.layers[1:]
    _, small = hf_checkpoint("spec_draft", hidden_size=32, num_hidden_layers=1, intermediate_size=86)
    return {"copy": copy.deepcopy(target), "shallow": shallow, "small": load_ours(small)}


@pytest.fixture(scope="module")
def prompts(prompt_ids):
    return [prompt_ids(20, seed=s) for s in range(4)]


def plain(model, prompt, n=N_NEW, eos_ids=()):
    return decoding.generate(model, [prompt], n, GREEDY, eos_ids)


def greedy_predictions(model, seq):
    """model's argmax after each prefix of seq, from one forward pass without a cache."""
    with torch.no_grad():
        return model(torch.tensor([seq], device=model.output.weight.device))[0].argmax(-1).tolist()


def expected_acceptance(seq, T, n_out, K, propose):
    """Accepted counts of the verify steps, replayed on the final sequence: a step at output index i (its token at
    position T + i - 1 is the last one known) accepts the leading proposed tokens that equal the target's; a plain
    decode step (propose returns None) counts as none. Steps that run past the output are left out."""
    counts, i = [], 1
    while i < n_out:
        proposal = propose(T + i)
        if proposal is None:
            i += 1
            continue
        n = 0
        while n < K and T + i + n < len(seq) and proposal[n] == seq[T + i + n]:
            n += 1
        if T + i + n >= len(seq):  # the step verified tokens past the end of the output
            break
        counts.append(n)
        i += n + 1
    return counts


@pytest.mark.parametrize("draft", ["copy", "shallow", "small"])
@pytest.mark.parametrize("K", [1, 3, 4])
def test_greedy_with_a_draft_model_is_plain_greedy(target, drafts, prompts, draft, K):
    model = drafts[draft]
    hits = []
    for prompt in prompts[:2]:
        ref = plain(target, prompt).tokens[0]
        res = speculative_generate(target, [prompt], N_NEW, GREEDY, proposer=DraftModel(model), speculate_k=K)
        assert res.tokens[0] == ref
        seq = prompt + ref
        pred = greedy_predictions(model, seq)
        # the draft's greedy proposals, computed on the true sequence: equal to what it proposes from its own cache
        # only if that cache holds exactly the accepted tokens (stale rejected positions masked, last one consumed)
        def propose(length):
            return pred[length - 1 : length - 1 + K]
        expected = expected_acceptance(seq, len(prompt), len(ref), K, propose)
        assert res.accepted[: len(expected)] == expected
        assert sum(res.accepted) + len(res.accepted) >= len(ref) - 1  # every token came from a verify step
        hits += res.accepted
    if draft == "copy":  # the all-accepted path, every time
        assert hits == [K] * len(hits)
    if draft == "small":
        assert hits.count(0) > len(hits) // 2
    if draft == "shallow":
        assert 0 < sum(hits) < K * len(hits)


def brute_force_lookup(seq, n, K):
    """Independent prompt-lookup reference: scan backwards for the last earlier occurrence of the final n tokens;
    its followers continue periodically where they run into the end."""
    def propose(length):
        s = seq[:length]
        for start in range(length - n - 1, -1, -1):
            if s[start : start + n] == s[-n:]:
                follow = s[start + n :]
                return [follow[j % len(follow)] for j in range(K)]
        return None
    return propose


def test_prompt_lookup_proposals():
    lookup = PromptLookup(2, [5, 6, 7, 8, 5, 6])
    assert lookup.follow(3) == [7, 8, 5]
    lookup.extend([9])
    assert lookup.follow(3) is None  # (6, 9) occurred nowhere before
    lookup.extend([5, 6])
    assert lookup.follow(2) == [9, 5]  # the most recent occurrence wins
    repeat = PromptLookup(1, [3, 4, 3])
    assert repeat.follow(5) == [4, 3, 4, 3, 4]  # the match ends near the end: its period continues


@pytest.mark.parametrize("n,K", [(1, 3), (2, 4), (3, 2)])
def test_greedy_prompt_lookup_is_plain_greedy(target, prompt_ids, n, K):
    hits = []
    for seed in range(6):
        prompt = prompt_ids(24, seed=10 + seed)
        ref = plain(target, prompt, 64).tokens[0]
        res = speculative_generate(target, [prompt], 64, GREEDY, proposer=PromptLookup(n), speculate_k=K)
        assert res.tokens[0] == ref
        expected = expected_acceptance(prompt + ref, len(prompt), len(ref), K, brute_force_lookup(prompt + ref, n, K))
        assert res.accepted[: len(expected)] == expected
        hits += res.accepted
    assert 0 in hits and K in hits  # both rejections and the all-accepted path occurred


def first_occurrence_eos(tokens, after=8):
    """An EOS id that the greedy output first produces at index >= after (so the run ends there)."""
    for j, t in enumerate(tokens):
        if j >= after and t not in tokens[:j]:
            return t, j
    raise AssertionError(f"no token first occurs after index {after} in {tokens}")


@pytest.mark.parametrize("mode", [dict(draft="copy", speculate_k=4), dict(draft="shallow", speculate_k=3),
                                  dict(prompt_lookup=1, speculate_k=3)])
def test_stops_at_eos_like_plain_greedy(target, drafts, prompts, mode):
    mode = dict(mode)
    proposer = DraftModel(drafts[mode.pop("draft")]) if "draft" in mode else PromptLookup(mode.pop("prompt_lookup"))
    for prompt in prompts:
        eos, j = first_occurrence_eos(plain(target, prompt).tokens[0])
        ref = plain(target, prompt, eos_ids=[eos])
        res = speculative_generate(target, [prompt], N_NEW, GREEDY, [eos], proposer=proposer, **mode)
        assert res.tokens == ref.tokens and len(res.tokens[0]) == j + 1 < N_NEW
        assert res.stopped == ref.stopped == [True]


def test_end_of_context_falls_back_to_plain_steps(hf_checkpoint, load_ours, prompt_ids):
    """With a 32-token context the last tokens leave no room for K more in the caches: plain decode steps finish."""
    short = load_ours(hf_checkpoint("short_context", max_position_embeddings=32)[1])
    prompt = prompt_ids(14, seed=3)
    ref = plain(short, prompt, 40).tokens[0]
    assert len(ref) == 32 - 14
    res = speculative_generate(short, [prompt], 40, GREEDY, proposer=DraftModel(copy.deepcopy(short)), speculate_k=4)
    assert res.tokens[0] == ref
    # an exact copy accepts everything: 3 verify steps of 5 tokens from position 14 reach position 29, where K = 4
    # more would pass the cache's end (32), so the last 2 tokens come from plain decode steps
    assert res.accepted == [4, 4, 4]
    assert speculative_generate(short, [prompt], 40, GREEDY, proposer=PromptLookup(1), speculate_k=4).tokens[0] == ref


def test_acceptance_stats():
    stats = acceptance_stats([0, 3, 3, 1], 3)
    assert stats == {"acceptance_histogram": [1, 1, 0, 2], "verify_steps": 4, "mean_accepted": 1.75,
                     "acceptance_rate": 1.75 / 3, "tokens_per_verify": 2.75}


# ------------------------------------------------------------------------------------------------ sampling

@pytest.fixture(scope="module")
def tiny_vocab(hf_checkpoint, load_ours):
    """A target and a deliberately different draft (another size, other random weights) over 8 tokens."""
    t = load_ours(hf_checkpoint("tiny_vocab", vocab_size=V)[1])
    d = load_ours(hf_checkpoint("tiny_vocab_draft", vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                intermediate_size=86)[1])
    return t, d


def test_accept_draft_reproduces_the_target_distribution(tiny_vocab, device):
    """200,000 independent speculative steps with K = 2, through accept_draft as generation calls it: the first three
    tokens (the block, completed by sampling the target where it is shorter) follow the target's joint distribution.
    Chi-square: p < 0.001 happens once in 1000 seeds if the rule is right. Total variation: with k cells of nonzero
    probability, E[TV] <= sqrt(k / N) / 2, and one sample moves TV by at most 1 / N, so (McDiarmid) TV exceeds that
    by 0.01 with probability below exp(-2 * 0.01^2 * N) = e^-40; accepting every draft token would give TV > 0.2."""
    target, draft = tiny_vocab
    P = next_token_tables(target, 3)  # P[0] (V,), P[1] (V, V), P[2] (V, V, V)
    Q = next_token_tables(draft, 2)
    truth, draft_joint = joint(P), joint(Q[:2] + [P[2]])
    assert 0.5 * (truth - draft_joint).abs().sum() > 0.2

    # the test's own draws and accept_draft's (the global generator) from differently seeded streams: the same seed
    # would make the i-th draft token and its acceptance test share a uniform number
    N, gen = 200_000, torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    d1 = torch.multinomial(Q[0], N, replacement=True, generator=gen)
    d2 = torch.multinomial(Q[1][d1], 1, generator=gen)[:, 0]
    # accept_draft runs on the device (its uniform and exponential draws too); the rest of the test on CPU
    n, x = accept_draft(torch.stack([P[0].expand(N, V), P[1][d1], P[2][d1, d2]], 1).to(device),
                        torch.stack([Q[0].expand(N, V), Q[1][d1]], 1).to(device), torch.stack([d1, d2], 1).to(device))
    n, x = n.cpu(), x.cpu()
    y1 = torch.where(n >= 1, d1, x)
    sampled_y2 = torch.multinomial(P[1][y1], 1, generator=gen)[:, 0]  # the target continues a 1-token block
    y2 = torch.where(n >= 2, d2, torch.where(n == 1, x, sampled_y2))
    sampled_y3 = torch.multinomial(P[2][y1, y2], 1, generator=gen)[:, 0]
    y3 = torch.where(n == 2, x, sampled_y3)
    counts = torch.bincount((y1 * V + y2) * V + y3, minlength=V ** 3).reshape(V, V, V)
    assert set(n.tolist()) == {0, 1, 2}  # rejections at each position and the bonus token all occurred
    assert chi_square_p_value(counts, truth) > 1e-3
    k = (truth > 0).sum().item()
    assert 0.5 * (counts / N - truth).abs().sum() < 0.5 * (k / N) ** 0.5 + 0.01


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_sampled_generation_follows_the_target(tiny_vocab, mode):
    """End to end: 600 generations of 3 tokens (the first from prefill, the others from speculative steps with
    K = 2); (first, second) and the third token follow the target's distributions (two tests, p > 0.001 each)."""
    target, draft = tiny_vocab
    truth = joint(next_token_tables(target, 3))
    torch.manual_seed(1)
    counts, accepted = torch.zeros(V, V, V), []
    for _ in range(600):
        proposer = DraftModel(draft) if mode == "draft" else PromptLookup(1)
        res = speculative_generate(target, [CONTEXT], 3, SAMPLING, speculate_k=2, proposer=proposer)
        counts[tuple(res.tokens[0])] += 1
        accepted += res.accepted
    assert 0 in accepted and 2 in accepted
    assert chi_square_p_value(counts.sum(2), truth.sum(2)) > 1e-3
    assert chi_square_p_value(counts.sum((0, 1)), truth.sum((0, 1))) > 1e-3


# ------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def int8_copy(quantized_copy):
    """A copy of the target's checkpoint directory with an int8 copy made by quantize.py beside it."""
    return quantized_copy("mha", "--mode", "int8")


def test_cli_compiled_with_an_int8_draft(cpu_target, int8_copy, tmp_path):
    tok = load_tokenizer(int8_copy / "tokenizer.model")
    text = "Yesterday the old farmer walks across the river and"
    row = decoding.generate(cpu_target, [tok.encode(text)], 16, GREEDY, tok.eos_ids).tokens[0]
    metrics = tmp_path / "m.json"
    proc = run_cli("--checkpoint_path", int8_copy / "model.pth", "--prompt", text, *BASE, "--num_samples", "2",
                   "--compile", "--draft_checkpoint_path", int8_copy / "model_int8.pth", "--speculate_k", "3",
                   "--metrics_json", metrics)
    assert_ran_cleanly(proc)
    assert "Compilation time" in proc.stderr and "accepted per verify step" in proc.stderr
    shown = text + tok.decode([t for t in row if t not in tok.eos_ids])
    assert proc.stdout == (shown + "\n") * 2
    m = json.loads(metrics.read_text())
    spec = m["speculative"]
    assert spec["speculate_k"] == 3 and spec["draft"].endswith("model_int8.pth")
    assert sum(spec["acceptance_histogram"]) == spec["verify_steps"] > 0
    assert spec["mean_accepted"] > 1  # an int8 copy mostly agrees with the target
    for s in m["samples"]:
        assert s["new_tokens"] == [len(row)] and sum(s["accepted"]) + len(s["accepted"]) >= len(row) - 1


def test_cli_prompt_lookup(cpu_target, int8_copy):
    tok = load_tokenizer(int8_copy / "tokenizer.model")
    text = "A king and a queen sing; a king and a queen"
    row = decoding.generate(cpu_target, [tok.encode(text)], 16, GREEDY, tok.eos_ids).tokens[0]
    proc = run_cli("--checkpoint_path", int8_copy / "model.pth", "--prompt", text, *BASE, "--prompt_lookup", "2")
    assert_ran_cleanly(proc)
    assert proc.stdout == text + tok.decode([t for t in row if t not in tok.eos_ids]) + "\n"


MISTAKES = {  # name -> (arguments, text of the error line); the first two run as subprocesses
    "vocabulary_mismatch": (["--draft_checkpoint_path", "{other_vocab}"], "vocabulary"),
    "batch_of_two": (["--prompt_lookup", "2", "--prompt", "a", "--prompt", "b"], "batch size 1"),
    "batch_size_2": (["--draft_checkpoint_path", "{draft}", "--batch_size", "2"], "batch size 1"),
    "penalty": (["--prompt_lookup", "2", "--repetition_penalty", "1.2"], "penalties"),
    "both_proposers": (["--prompt_lookup", "2", "--draft_checkpoint_path", "{draft}"], "choose one"),
    "k_alone": (["--speculate_k", "3"], "--speculate_k needs"),
    "k_zero": (["--prompt_lookup", "2", "--speculate_k", "0"], "speculate_k"),
    "lookup_zero": (["--prompt_lookup", "0"], "--prompt_lookup"),
    "interactive": (["--prompt_lookup", "2", "--interactive"], "interactive"),
}


@pytest.fixture(scope="module")
def mistake_args(hf_checkpoint, int8_copy):
    _, other = hf_checkpoint("spec_other_vocab", vocab_size=512)
    files = {"other_vocab": other / "model.pth", "draft": int8_copy / "model_int8.pth"}
    return {name: ["--checkpoint_path", int8_copy / "model.pth", *BASE, *[a.format(**files) for a in args]]
            for name, (args, _) in MISTAKES.items()}


def test_cli_vocabulary_mismatch_and_batches_end_in_one_error_line(mistake_args):
    from concurrent.futures import ThreadPoolExecutor

    names = ["vocabulary_mismatch", "batch_of_two"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(names, pool.map(lambda name: run_cli(*mistake_args[name]), names)))
    for name, proc in procs.items():
        assert proc.returncode != 0, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and MISTAKES[name][1] in lines[0], proc.stderr


@pytest.mark.parametrize("name", list(MISTAKES))
def test_cli_mistakes_exit_with_one_error_line(mistake_args, capsys, name):
    """In-process, the same path: main() exits with the message (printed as one line, exit status 1) and has
    printed nothing else before."""
    with pytest.raises(SystemExit) as exit_:
        generate.main(list(map(str, mistake_args[name])))
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert MISTAKES[name][1] in message
    assert capsys.readouterr().err == ""


def test_python_api_refuses_batches_and_penalties(target, drafts):
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(target, [[1, 2, 3], [4, 5, 6]], 4, GREEDY, proposer=PromptLookup(1))
    with pytest.raises(ValueError, match="penalties"):
        speculative_generate(target, [[1, 2, 3]], 4, SamplingConfig(presence_penalty=0.5),
                             proposer=DraftModel(drafts["copy"]))


def test_python_api_refuses_a_draft_with_another_vocabulary(target, hf_checkpoint, load_ours):
    other = load_ours(hf_checkpoint("spec_other_vocab", vocab_size=512)[1])
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, [[1, 2, 3]], 4, GREEDY, proposer=DraftModel(other))
