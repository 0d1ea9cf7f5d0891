"""llama_fast/serving (engine, scheduler, runner, sampler, paged_cache): continuous batching over the paged KV
cache, checked against decoding.generate() of each prompt alone (the reference: the static-cache path, itself
checked against HF transformers in test_generate.py), in float32 on --device."""
import copy
import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy

from decoding import generate
from llama_fast.serving.engine import LOOKUP_WINDOW, Engine, EngineConfig, EngineFailure
from llama_fast.quant.kv_cache import Int8PagedKVCache
from llama_fast.serving.paged_cache import BlockPool, PagedKVCache
from llama_fast.serving.request import Request
from llama_fast.serving.sampler import sample_rows
from llama_fast.serving.scheduler import BACKLOG_STEPS, LOAD_MARGIN, LOAD_WINDOW, Scheduler
from llama_fast.serving.step_time import MIN_DECODE_SAMPLES, StepTimes
from sampling import SamplingConfig, apply_penalties, draw, logits_to_probs

pytestmark = pytest.mark.device
GREEDY = SamplingConfig(temperature=0)


def alone(model, prompt, max_tokens, sampling=GREEDY, eos_ids=()) -> list:
    return generate(model, [prompt], max_tokens, sampling, eos_ids).tokens[0]


def workload(prompt_ids, n: int, seed: int, shared_prefix: int = 24) -> list:
    """n (prompt, max_tokens) of 5-60 prompt tokens and 5-40 new ones; every third prompt starts with the same
    shared_prefix tokens (a system prompt), so that the prefix cache has something to find."""
    rng, prefix = random.Random(seed), prompt_ids(shared_prefix, seed=999)
    jobs = []
    for i in range(n):
        prompt = prompt_ids(rng.randint(5, 60), seed=seed * 100 + i)
        if i % 3 == 0:
            prompt = prefix + prompt[1:rng.randint(2, 30)]
        jobs.append((prompt, rng.randint(5, 40)))
    return jobs


def run_arriving(engine: Engine, requests: list, every: int = 2):
    """Add a request every `every` steps (arrivals while others decode), then step until all are done."""
    pending, step = list(requests), 0
    while pending or engine.has_work():
        if pending and step % every == 0:
            engine.add(pending.pop(0))
        engine.step()
        step += 1


@pytest.mark.parametrize("name", ["gqa", "mistral_window", "qwen2", "mixtral"])
def test_every_response_equals_generate_alone_under_load(name, hf_checkpoint, load_ours, prompt_ids):
    """24 requests of different lengths arriving at different times, a pool of 14 blocks of 8 tokens (one request
    needs up to 13): requests are preempted and recomputed, prefixes are shared; greedy output is token for token
    what each prompt gives alone."""
    _, d = hf_checkpoint(name)
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, None, EngineConfig(max_batch_size=8, block_size=8, kv_cache_tokens=112, prefill_chunk=16))
    requests = [Request(p, n) for p, n in workload(prompt_ids, 24, seed=1)]
    run_arriving(engine, requests)
    assert engine.stats["preemptions"] > 0 and engine.stats["prefix_cache_hit_tokens"] > 0
    for r in requests:
        assert r.output == alone(reference, r.prompt, r.max_tokens), (len(r.prompt), r.max_tokens)
        assert r.finish_reason == "length"
    assert engine.scheduler.pool.n_used == 0 and not engine.scheduler.running and not engine.scheduler.waiting


def test_a_burst_runs_one_forward_pass_per_step_within_the_token_budget(hf_checkpoint, load_ours, prompt_ids):
    """32 requests at once, long prompts (60-120 tokens) and short ones (3-12) mixed, 24 tokens per step, prompt
    chunks of at most 16, a pool small enough to preempt: every step is one forward pass within the budget; decoding
    rows and chunks of several prompts share passes; requests are admitted while others still read their prompts;
    every response is token for token what its prompt gives alone."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    config = EngineConfig(max_batch_size=8, block_size=8, kv_cache_tokens=160, max_num_batched_tokens=24,
                          prefill_chunk=16, itl_target_ms=math.inf)  # the token budget alone (times: the next test)
    engine = Engine(model, None, config)
    passes, forward = [], engine.runner.forward

    def recorded(rows):
        passes.append([(r.n_computed, r.n_pending, n) for r, n in rows])
        return forward(rows)
    engine.runner.forward = recorded
    rng = random.Random(5)
    requests = [Request(prompt_ids(rng.choice([rng.randint(3, 12), rng.randint(60, 120)]), seed=500 + i),
                        rng.randint(3, 20)) for i in range(32)]
    for r in requests:
        engine.add(r)
    while engine.has_work():
        before = len(passes)
        engine.step()
        assert len(passes) - before <= 1
    assert all(sum(n for *_, n in rows) <= 24 and max(n for *_, n in rows) <= 16 for rows in passes)
    chunk = lambda row: row[2] > 1 or row[1] > 1  # noqa: E731  (part of a prompt, not a sampled token)
    assert any(any(not chunk(row) for row in rows) and sum(map(chunk, rows)) >= 2 for rows in passes)
    assert any(any(row[0] == 0 for row in rows) and any(row[0] > 0 and chunk(row) for row in rows)
               for rows in passes)  # a first chunk beside another prompt's later one
    assert engine.stats["preemptions"] > 0
    for r in requests:
        assert r.output == alone(reference, r.prompt, r.max_tokens), (len(r.prompt), r.max_tokens)
    assert engine.scheduler.pool.n_used == 0


@pytest.mark.parametrize("target_ms, cap", [(20, 56), (1, 8)])
def test_steps_with_decoding_rows_keep_to_the_time_target(target_ms, cap, hf_checkpoint, load_ours, prompt_ids):
    """The time target (itl_target_ms) bounds the prompt tokens beside decoding rows. The engine's clock is replaced
    by a step cost known exactly, 6 ms plus 0.25 ms a token of the rows that do not decode one token, so that what
    fits is arithmetic: in 20 ms, (20 - 6) / 0.25 = 56 tokens; in 1 ms, none, so a block (8) a step (the default
    target follows the load: the next test). Before decoding rows alone are timed, the token budget (64) alone
    bounds a step; then a block a step until three tokens' costs are known; steps without decoding rows always
    have the whole budget. Every response is still token for token what its prompt gives alone."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, None, EngineConfig(max_batch_size=8, block_size=8, max_num_batched_tokens=64,
                                              itl_target_ms=target_ms))
    observe, steps = engine.scheduler.times.observe, []

    def step_cost(decoding, others, seconds):
        known = engine.scheduler.times.tokens_within(decoding, None) is not None  # before this step's time
        steps.append((decoding, others, known))
        observe(decoding, others, 0.006 + 0.00025 * others)
    engine.scheduler.times.observe = step_cost
    rng = random.Random(8)
    requests = [Request(prompt_ids(rng.randint(40, 120), seed=900 + i), rng.randint(10, 30)) for i in range(12)]
    run_arriving(engine, requests, every=3)
    with_rows = [others for decoding, others, known in steps if decoding and known]
    assert len(with_rows) > 20 and max(with_rows) == cap
    assert max(others for decoding, others, _ in steps if not decoding) == 64
    for r in requests:
        assert r.output == alone(reference, r.prompt, r.max_tokens), (len(r.prompt), r.max_tokens)


def test_step_times_are_medians_of_what_the_engine_measured():
    """StepTimes' arithmetic: a decoding step's time is the median of the last ones of its batch size (a 10 s
    outlier, a compile, moves nothing), else the nearest batch size measured; the cost per other token is what a
    step took beyond its decoding rows' time, over those tokens; the tokens that fit are the room over that cost
    (none, so a block, while that cost is not known; no limit while nothing is). The default target is 1.75 times
    the decoding rows' own time, however long the steps beside prompts were."""
    times = StepTimes()
    assert times.tokens_within(4, 0.02) is None  # nothing measured: no limit but the token budget
    for seconds in (0.010, 0.011, 10.0, 0.012):
        times.observe(4, 0, seconds)
    assert times.decoding_time(4) == pytest.approx(0.0115) and times.decoding_time(6) == pytest.approx(0.0115)
    assert times.tokens_within(4, 0.02) == 0  # the cost of a token beside them is not known yet: a block
    for others, seconds in ((10, 0.0215), (20, 0.0315), (40, 0.0515)):
        times.observe(4, others, seconds)
    assert statistics.median(times.per_token) == pytest.approx(0.001)
    assert times.tokens_within(4, 0.0315) == 20 and times.tokens_within(4, math.inf) is None
    assert times.tokens_within(0, 0.02) is None
    assert times.tokens_within(4, None) == 8  # 1.75 x 11.5 - 11.5 = 8.6 ms of tokens at 1 ms
    for _ in range(8):
        times.observe(4, 40, 0.0515)
    assert times.tokens_within(4, None) == 8  # (long steps beside prompts do not move it)


def test_the_default_target_reads_at_least_the_prompt_tokens_the_load_brings():
    """With the default target, a step with decoding rows may read beside them at least the load's share: LOAD_MARGIN
    times the prompt tokens admitted per step over the last LOAD_WINDOW steps, or a BACKLOG_STEPS-th of the prompt
    tokens still to read by the running requests and the waiting ones the batch has room for, if more, even where
    its time would fit fewer (so that a heavy load's prompts are read as fast as they come, a little in every step),
    within what is left of the token budget; a block when the load brings less. An explicit target is not widened,
    and a step without decoding rows has the whole budget."""
    times = StepTimes()
    for others, seconds in ((0, 0.010),) * 3 + ((10, 0.020),) * 3:  # rows alone 10 ms, 1 ms a token beside them
        times.observe(4, others, seconds)
    default = Scheduler(BlockPool(64, 8), 8, 512, 512, {}, None)
    explicit = Scheduler(BlockPool(64, 8), 8, 512, 512, {}, 0.0175)  # 7.5 ms of tokens: 7, so a block
    for scheduler in (default, explicit):
        scheduler.times = times
        assert scheduler.others_budget(4, 500) == 8  # 1.75 x 10 ms - 10 ms = 7 tokens: a block
        scheduler.admitted.extend([1024] * 10)
    assert LOAD_WINDOW == 128 and LOAD_MARGIN == 1.25
    assert default.load_share() == 100  # 1.25 x 10240 / 128
    assert default.others_budget(4, 500) == 100 and default.others_budget(4, 60) == 60
    assert explicit.others_budget(4, 500) == 8 and default.others_budget(0, 500) == 500
    default.running.append(Request([1] * 6400, 1))  # prompt tokens still to read: at least 6400 / BACKLOG_STEPS
    assert BACKLOG_STEPS == 32 and default.load_share() == 200 and default.others_budget(4, 500) == 200
    default.waiting.extend(Request([1] * 3200, 1) for _ in range(8))  # and those of the 7 the batch has room for
    assert default.load_share() == (6400 + 7 * 3200) // 32
    default.running.clear()
    default.waiting.clear()
    default.admitted.extend([0] * LOAD_WINDOW)  # the load has gone: a block again
    assert default.others_budget(4, 500) == 8


def test_the_load_is_counted_in_prompt_tokens_to_compute(hf_checkpoint, load_ours, prompt_ids):
    """What a step admits counts as the tokens it leaves to compute: a prompt less the blocks the prefix cache
    holds."""
    _, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), None, EngineConfig(max_batch_size=4, block_size=8))
    prompt = prompt_ids(40, seed=71)
    for cached in (0, 32):  # the second time, its first 4 blocks (of the 39 tokens before the last) are cached
        r = Request(prompt, 2)
        engine.add(r)
        engine.step()
        assert engine.scheduler.admitted[-1] == 40 - cached and r.cached_tokens == cached
        while not r.finish_reason:
            engine.step()
            assert engine.scheduler.admitted[-1] == 0


def test_warm_up_leaves_the_first_step_time_estimates(hf_checkpoint, load_ours):
    """After warm_up the scheduler knows how long a step of decoding rows takes and what a prompt token beside them
    costs, timed on the model itself, so that the first burst of clients is held to the time target too; the
    counters are zero, no gap is the load's yet, and nothing is left running or holding blocks. The same from
    time_first_steps alone."""
    _, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), None, EngineConfig(max_batch_size=4, block_size=8))
    engine.warm_up()
    times = engine.scheduler.times
    assert times.decoding_time(1) > 0 and len(times.per_token) >= MIN_DECODE_SAMPLES
    assert times.tokens_within(1, None) is not None and not any(engine.scheduler.admitted)
    assert all(value == 0 for value in engine.stats.values())
    assert not engine.has_work() and engine.scheduler.pool.n_used == 0
    eager = Engine(load_ours(d), None, EngineConfig(max_batch_size=4, block_size=8))
    eager.time_first_steps()  # what serve.py runs without --compile: its requests are not the server's either
    assert eager.scheduler.times.tokens_within(1, None) is not None
    assert all(value == 0 for value in eager.stats.values())


def test_a_request_that_fails_fails_alone(hf_checkpoint, load_ours, prompt_ids):
    """A forward pass that fails whenever one request is in it (a stand-in for a fault only its input meets), and
    a client whose callback raises: those two requests end with finish_reason "error", an error message and their
    blocks freed; the others, sharing their steps, finish as they would alone. A model that fails whatever it
    computes stops the engine with EngineFailure, its requests failed."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, None, EngineConfig(max_batch_size=8, block_size=8))
    forward = engine.runner.forward
    poisoned = Request(prompt_ids(30, seed=61), 10)

    def faulty(rows):
        if any(r is poisoned for r, _ in rows):
            raise RuntimeError("a fault only this request meets")
        return forward(rows)
    engine.runner.forward = faulty

    def broken_client(r, text, tokens):
        raise ConnectionError("the client's callback failed")
    rude = Request(prompt_ids(12, seed=62), 10, on_output=broken_client)
    others = [Request(prompt_ids(5 + 9 * i, seed=70 + i), 12) for i in range(4)]
    run_arriving(engine, [others[0], poisoned, others[1], rude, *others[2:]], every=1)
    assert poisoned.finish_reason == rude.finish_reason == "error"
    assert "a fault only this request meets" in poisoned.error and "callback failed" in rude.error
    for r in others:
        assert r.finish_reason == "length" and r.output == alone(reference, r.prompt, 12)
    assert engine.stats["requests_failed"] == 2 and engine.scheduler.pool.n_used == 0

    def dead(rows):
        raise RuntimeError("device lost")
    engine.runner.forward = dead
    doomed = Request(prompt_ids(9, seed=80), 5)
    engine.add(doomed)
    with pytest.raises(EngineFailure, match="fails whatever it computes: RuntimeError: device lost"):
        engine.step()
    assert doomed.finish_reason == "error" and engine.scheduler.pool.n_used == 0


def test_prompt_lookup_in_the_engine_gives_what_plain_decoding_gives(hf_checkpoint, load_ours, prompt_ids):
    """Greedy requests speculating by prompt lookup (prompts that repeat themselves, so that proposals are made and
    some accepted), beside plain greedy, sampled and penalized ones, arriving while others run, in a pool small
    enough to preempt: each is token for token what its prompt gives alone; a later prompt that extends a
    speculated one reuses the blocks its verified tokens filled, and is still exact."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    config = EngineConfig(max_batch_size=6, block_size=8, kv_cache_tokens=200, max_num_batched_tokens=32,
                          prompt_lookup=2, speculate_k=4)
    engine = Engine(model, None, config)
    rng = random.Random(11)
    requests = []
    for i in range(12):
        phrase = prompt_ids(rng.randint(4, 9), seed=300 + i)
        prompt = (phrase * 6)[:rng.randint(20, 50)]
        sampling = [GREEDY, GREEDY, SamplingConfig(temperature=0.8), SamplingConfig(temperature=0,
                                                                                   repetition_penalty=1.2)][i % 4]
        requests.append(Request(prompt, rng.randint(8, 30), sampling, seed=i,
                                speculation=(0, 4) if i % 5 == 4 else None))
    run_arriving(engine, requests, every=2)
    assert engine.stats["draft_tokens"] > 0 and 0 < engine.stats["accepted_draft_tokens"]
    assert engine.stats["preemptions"] > 0
    for r in requests:
        if r.sampling.greedy:
            assert r.output == alone(reference, r.prompt, r.max_tokens, r.sampling), (len(r.prompt), r.max_tokens)
    accepted = engine.stats["accepted_draft_tokens"]
    first = engine.generate([(prompt_ids(6, seed=400) * 5)[:27]], 30)[0]
    assert engine.stats["accepted_draft_tokens"] > accepted
    longer = first.prompt + first.output + prompt_ids(5, seed=77)
    again = engine.generate([longer], 10)[0]
    assert again.cached_tokens >= (len(first.prompt) + len(first.output) - 1) // 8 * 8
    assert again.output == alone(reference, longer, 10)


def test_a_request_whose_drafts_miss_stops_proposing(hf_checkpoint, load_ours, prompt_ids):
    """A forward pass whose greedy token never equals the proposal (logits made so): after LOOKUP_WINDOW
    verifications that accepted nothing the request proposes no more, and decodes one token per step."""
    _, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), None, EngineConfig(max_batch_size=2, block_size=8, prompt_lookup=1, speculate_k=3))
    forward, sizes = engine.runner.forward, []

    def never_the_draft(rows):
        logits = forward(rows)
        sizes.append([n for _, n in rows])
        for r, _ in rows:
            if r.draft:  # every position predicts a token no draft has
                logits[:, :] = -1.0
                logits[:, max(r.draft) + 1] = 1.0
        return logits
    engine.runner.forward = never_the_draft
    r = engine.generate([[5, 6] * 10], 30)[0]
    verifying = [n for step in sizes for n in step if n > 1][1:]  # after the prompt's chunk
    assert len(verifying) == LOOKUP_WINDOW and r.lookup is None
    assert engine.stats["accepted_draft_tokens"] == 0 and len(r.output) == 30


def test_int8_kv_cache_holds_twice_the_tokens_and_serves_like_itself_alone(hf_checkpoint, load_ours, prompt_ids):
    """--kv_cache_dtype int8: the same memory holds 1.94x the tokens (head_dim 64: 66 bytes a vector against 128 in
    bf16); under load (preemption, prefix caching, prompt chunks beside decoding rows) each response is token for
    token what the int8 engine gives the request alone; the greedy tokens agree with the float cache's for most
    requests (their share is printed)."""
    bf16 = PagedKVCache.slot_bytes(8, 64, torch.bfloat16)
    assert bf16 / Int8PagedKVCache.slot_bytes(8, 64, torch.bfloat16) >= 1.9
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference, floats = copy.deepcopy(model), copy.deepcopy(model)
    config = EngineConfig(max_batch_size=8, block_size=8, kv_cache_tokens=112, max_num_batched_tokens=24,
                          kv_cache_dtype="int8")
    engine = Engine(model, None, config)
    requests = [Request(p, n) for p, n in workload(prompt_ids, 16, seed=2)]
    run_arriving(engine, requests)
    assert engine.stats["preemptions"] > 0 and engine.stats["prefix_cache_hit_tokens"] > 0
    alone_int8 = Engine(reference, None, EngineConfig(max_batch_size=1, block_size=8, kv_cache_dtype="int8"))
    float_cache = Engine(floats, None, EngineConfig(max_batch_size=1, block_size=8))
    agree = 0
    for r in requests:
        assert r.output == alone_int8.generate([r.prompt], r.max_tokens)[0].output
        agree += r.output == float_cache.generate([r.prompt], r.max_tokens)[0].output
    print(f"int8 KV: {agree} of {len(requests)} greedy responses equal to the float cache's")
    assert agree >= len(requests) // 2


def test_a_shared_prefix_is_computed_once(hf_checkpoint, load_ours, prompt_ids):
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, None, EngineConfig(max_batch_size=4, block_size=8))
    system = prompt_ids(50, seed=7)
    first = engine.generate([system + [5, 6, 7]], 8)[0]
    computed = engine.stats["prefill_tokens"]
    second = engine.generate([system + [9, 10]], 8)[0]
    assert second.cached_tokens == 48  # the 6 full blocks of the shared 50 tokens
    assert engine.stats["prefill_tokens"] - computed == len(second.prompt) - 48
    assert first.output == alone(reference, first.prompt, 8) and second.output == alone(reference, second.prompt, 8)


def hf_logprobs(hf_model, tokens: list) -> torch.Tensor:
    """transformers' float32 log-softmax after each token of the sequence."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), -1)


def test_logprobs_and_prompt_scores_equal_transformers(hf_checkpoint, load_ours, prompt_ids):
    """Logprobs of sampled tokens and of every prompt token (echo), with their top alternatives, equal transformers'
    log-softmax (float32, 2e-3), for requests batched with others, in prompt chunks, after a cached prefix."""
    hf, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), None, EngineConfig(max_batch_size=4, block_size=8, prefill_chunk=16))
    system = prompt_ids(40, seed=11)
    engine.generate([system + [7, 8]], 2)  # its blocks are cached: the scored prompt below must not reuse them
    scored = Request(system + prompt_ids(20, seed=12)[1:], 6, SamplingConfig(temperature=0.8), seed=3, logprobs=3,
                     prompt_logprobs=2)
    score_only = Request(prompt_ids(30, seed=13), 0, prompt_logprobs=0)
    others = [Request(prompt_ids(25, seed=14 + i), 8) for i in range(2)]
    run_arriving(engine, [others[0], scored, score_only, others[1]], every=1)
    assert score_only.output == [] and score_only.finish_reason == "length"
    for r in (scored, score_only):
        reference = hf_logprobs(hf, r.tokens)
        assert len(r.prompt_token_logprobs) == len(r.prompt) - 1
        for i, (lp, top) in enumerate(r.prompt_token_logprobs + r.token_logprobs):
            assert abs(lp - reference[i, r.tokens[i + 1]].item()) < 2e-3
            values, ids = reference[i].topk(len(top)) if top else (torch.tensor([]), torch.tensor([]))
            assert [t for t, _ in top] == ids.tolist() and torch.allclose(torch.tensor([v for _, v in top]),
                                                                           values, atol=2e-3)
        assert len(r.token_logprobs) == len(r.output) and all(len(top) == r.logprobs for _, top in r.token_logprobs)


def test_logit_bias_and_siblings_that_share_a_prompt(hf_checkpoint, load_ours, prompt_ids):
    """logit_bias steers greedy decoding (a +100 token is always chosen, a -100 one never) and leaves the logprobs
    the model's own; requests sharing a prompt (the API's n) wait for it to be cached and reuse its blocks."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, None, EngineConfig(max_batch_size=4, block_size=8))
    prompt = prompt_ids(30, seed=21)
    plain = alone(reference, prompt, 6)
    banned = engine.generate([prompt], 6, logit_bias={plain[0]: -100.0}, logprobs=1)[0]
    assert banned.output[0] != plain[0] and banned.token_logprobs[0][1][0][0] == plain[0]  # the model's top token
    forced = engine.generate([prompt], 3, logit_bias={42: 100.0})[0]
    assert forced.output == [42, 42, 42]
    first = Request(prompt_ids(41, seed=22), 5, SamplingConfig(temperature=1.0), seed=1)
    siblings = [first] + [Request(first.prompt, 5, first.sampling, seed=1 + i, shares_prompt_with=first)
                          for i in range(1, 3)]
    computed = engine.stats["prefill_tokens"]
    for r in siblings:
        engine.add(r)
    while engine.has_work():
        engine.step()
    assert [r.cached_tokens for r in siblings] == [0, 40, 40]
    assert engine.stats["prefill_tokens"] - computed == 41 + 2 * 1
    again = engine.generate([first.prompt], 5, first.sampling, seed=2)[0]
    assert again.output == siblings[1].output  # seed + i: what that seed gives alone


NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["n"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}}, "required": ["ok", "none"]},
    {"type": "object", "properties": {"name": NAME}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                                               "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                       "maximum": 9}, "maxItems": 4}},
     "required": ["xs"]},
    {"type": "object", "properties": {"who": {"type": "object", "properties": {"name": NAME, "age": {
        "type": "integer", "minimum": 1, "maximum": 99}}, "required": ["name", "age"]}}, "required": ["who"]},
    {"type": "object", "properties": {"a": {"const": 1}, "b": {"enum": [True, None, "x"]}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
     "required": ["title"]},  # year optional
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "maximum": 9, "minimum": 0},
                                                      {"enum": ["none"]}]}}, "required": ["v"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}}, "required": ["x"]}},
     "properties": {"start": {"$ref": "#/$defs/p"}, "end": {"$ref": "#/$defs/p"}}, "required": ["start", "end"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "done": {"type": "boolean"}}, "required": ["id", "done"],
        "additionalProperties": False}}}, "required": ["items"]},
    {"type": "object", "properties": {"s": {"type": ["string", "null"], "maxLength": 5}}, "required": ["s"]},
    {"type": "object", "properties": {"k": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}},
     "required": ["k"]},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "boolean"},
                                                                               {"enum": [1, 2]}],
                                               "items": False}}, "required": ["pair"]},
    {"type": "object", "properties": {"m": {"type": "object", "additionalProperties": {"type": "integer",
                                                                                     "minimum": 0, "maximum": 3},
                                            "maxProperties": 2}}, "required": ["m"]},
    {"type": "object", "properties": {"level": {"enum": ["low", "high"]}, "score": {"type": "number", "minimum": -1,
                                                                                   "maximum": 1}},
     "required": ["level", "score"], "additionalProperties": False},
    None,  # any JSON object (OpenAI's json_object)
]


def test_structured_output_validates_beside_unconstrained_rows(hf_checkpoint, load_ours, prompt_ids, sp_tokenizer):
    """21 schemas (enums, bounded integers and numbers, arrays, nested objects, required and optional fields, $ref,
    anyOf, patterns) and any JSON object, each greedy and sampled, batched with unconstrained requests: every
    constrained output that ends parses and validates (jsonschema), one cut by max_tokens ends with "length", and
    the unconstrained rows are token for token what they give alone."""
    import jsonschema

    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, sp_tokenizer, EngineConfig(max_batch_size=8, block_size=8))
    constrained = [Request(prompt_ids(12, seed=60 + i), 96, GREEDY if i % 2 else SamplingConfig(temperature=1.0),
                           eos_ids=tuple(sp_tokenizer.eos_ids), seed=i, grammar=engine.grammars.matcher(schema))
                   for i, schema in enumerate(SCHEMAS + SCHEMAS[:1])]
    free = [Request(prompt_ids(20, seed=90 + i), 24) for i in range(6)]
    run_arriving(engine, [r for pair in itertools.zip_longest(constrained, free) for r in pair if r], every=1)
    ended = 0
    for r, schema in zip(constrained, SCHEMAS + SCHEMAS[:1]):
        assert r.finish_reason in ("stop", "length"), r.error
        if r.finish_reason == "stop":
            jsonschema.validate(json.loads(r.text), schema or {"type": "object"})
            ended += 1
    assert ended >= len(SCHEMAS) * 3 // 4
    for r in free:
        assert r.output == alone(reference, r.prompt, 24)
    short = engine.generate([prompt_ids(12, seed=7)], 3, grammar=engine.grammars.matcher(SCHEMAS[8]))[0]
    assert short.finish_reason == "length" and len(short.output) == 3


def test_structured_output_with_a_tokenizer_that_turns_newlines_into_spaces(tmp_path):
    """The demo's tokenizer (trained with SentencePiece's default normalization: a newline becomes a space) still
    spells what a grammar forces (`"name":"` after `{`): random walks under the masks never see the end allowed
    before the JSON is whole, and the outputs that end validate. (Once, llguidance could not encode the forced
    text, allowed only the end, and `{` came back as a finished answer.)"""
    import jsonschema
    from make_demo_checkpoint import train_tokenizer

    from llama_fast.serving.grammar import Grammars
    from tokenizer import load_tokenizer

    train_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    grammars = Grammars(tok, tok.vocab_size)
    generator, ended = torch.Generator().manual_seed(0), 0
    for schema in SCHEMAS:
        matcher, ids = grammars.matcher(schema), []
        for _ in range(200):
            allowed = grammars.masks([matcher])[0]
            assert matcher.complete() or not allowed[tok.eos_ids].any(), (schema, tok.decode(ids))
            token = int(torch.randn(tok.vocab_size, generator=generator).masked_fill(~allowed, -math.inf).argmax())
            if token in tok.eos_ids:
                jsonschema.validate(json.loads(tok.decode(ids)), schema or {"type": "object"})
                ended += 1
                break
            assert matcher.accept(token)
            ids.append(token)
    assert ended >= len(SCHEMAS) // 2


def test_a_stuck_grammar_fails_its_request_instead_of_ending_it(hf_checkpoint, load_ours, prompt_ids, sp_tokenizer,
                                                                monkeypatch):
    """If the text a grammar forces cannot be tokenized, llguidance allows only the end of the sequence: the
    request then fails (finish_reason "error") rather than ending with half a JSON value as if it were whole."""
    from llama_fast.serving import grammar

    def cannot(self, text):
        raise ValueError("cannot spell it")
    monkeypatch.setattr(grammar.Vocabulary, "__call__", cannot)
    _, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), sp_tokenizer, EngineConfig(max_batch_size=2, block_size=8))
    stuck = Request(prompt_ids(12, seed=3), 30, eos_ids=tuple(sp_tokenizer.eos_ids),
                    grammar=engine.grammars.matcher(SCHEMAS[0]))
    free = Request(prompt_ids(12, seed=4), 10)
    run_arriving(engine, [stuck, free], every=1)
    assert stuck.finish_reason == "error" and "cannot go on" in stuck.error
    assert free.finish_reason == "length" and len(free.output) == 10


def test_schemas_the_grammar_library_cannot_enforce_are_refused(sp_tokenizer):
    from llama_fast.serving.grammar import GrammarError, Grammars

    grammars = Grammars(sp_tokenizer, sp_tokenizer.vocab_size)
    for schema in ({"type": "array", "uniqueItems": True}, {"$ref": "#/$defs/missing"}, {"type": "wat"}):
        with pytest.raises(GrammarError):
            grammars.matcher(schema)


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(hf_checkpoint, load_ours, prompt_ids):
    _, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), None, EngineConfig(max_batch_size=8, block_size=8))
    settings = SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
                              frequency_penalty=0.3, presence_penalty=0.2)
    prompt = prompt_ids(20, seed=3)
    solo = engine.generate([prompt], 30, settings, seed=1234)[0].output
    others = [Request(prompt_ids(10 + 7 * i, seed=40 + i), 25, s, seed=s_seed) for i, (s, s_seed) in enumerate([
        (GREEDY, None), (SamplingConfig(temperature=1.3, top_k=0), None), (SamplingConfig(temperature=0.5), 7),
        (SamplingConfig(temperature=0.7, top_p=0.5, presence_penalty=1.0), None), (settings, 99)])]
    mine = Request(prompt, 30, settings, seed=1234)
    run_arriving(engine, others[:3] + [mine] + others[3:], every=3)
    assert mine.output == solo
    assert engine.generate([prompt], 30, settings, seed=4321)[0].output != solo  # the seed matters
    assert others[0].output == alone(load_ours(d), others[0].prompt, 25)  # greedy rows unaffected by sampled ones


def test_the_batched_sampler_draws_each_row_as_it_would_alone():
    """sample_rows draws a batch's tokens with one host sync; each row's token is what sampling.draw gives it alone
    (its penalties, filters and own generator), whatever the other rows' settings."""
    V, torch_gen = 64, torch.Generator().manual_seed(0)
    logits = torch.randn(7, V, generator=torch_gen) * 3
    settings = [GREEDY, SamplingConfig(temperature=0.8, top_k=10), SamplingConfig(temperature=0.8, top_k=10),
                SamplingConfig(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5),
                SamplingConfig(temperature=1.2, top_p=0.7, min_p=0.05, presence_penalty=0.4), GREEDY,
                SamplingConfig(temperature=0.8, top_k=10)]
    rows = [Request([1, 2, 3], 5, cfg, seed=100 + i) for i, cfg in enumerate(settings)]
    expected = []
    for i, r in enumerate(rows):
        r.generator = torch.Generator().manual_seed(r.seed)
        r.seen = torch.rand(V, generator=torch_gen) < 0.3
        r.counts = torch.randint(0, 3, (V,), generator=torch_gen).float() * r.seen
        row = logits[i:i + 1]
        if r.sampling.penalized:
            row = apply_penalties(row, r.sampling, r.seen[None], r.counts[None])
        alone = torch.Generator().manual_seed(r.seed)
        expected.append(int(row.argmax()) if r.sampling.greedy else int(draw(logits_to_probs(row, r.sampling), alone)))
    assert sample_rows(logits, rows) == expected
    assert expected[1] != expected[2] or expected[2] != expected[6]  # rows with one setting still draw apart


def test_penalized_greedy_rows_match_generate(hf_checkpoint, load_ours, prompt_ids):
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, None, EngineConfig(max_batch_size=4, block_size=8))
    settings = [SamplingConfig(temperature=0, repetition_penalty=1.4), SamplingConfig(temperature=0,
                frequency_penalty=0.8, presence_penalty=0.5), GREEDY]
    requests = [Request(prompt_ids(15 + 5 * i, seed=60 + i), 30, s) for i, s in enumerate(settings)]
    run_arriving(engine, requests, every=1)
    for r in requests:
        assert r.output == alone(reference, r.prompt, 30, r.sampling)


def test_eos_stop_strings_and_streamed_text(hf_checkpoint, load_ours, prompt_ids, sp_tokenizer):
    """EOS ends a request (the token kept in output, not in text); a stop string ends the text before it; what
    on_output streams joins to the final text."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    engine = Engine(model, sp_tokenizer, EngineConfig(max_batch_size=4, block_size=8))
    prompt = prompt_ids(12, seed=5)
    full = alone(reference, prompt, 40)
    text = sp_tokenizer.decode(full)
    eos = full[17]  # pretend the 18th token is an end-of-sequence token
    r = engine.generate([prompt], 40, eos_ids=(eos,))[0]
    assert r.finish_reason == "stop" and r.output == full[:full.index(eos) + 1]
    assert r.text == sp_tokenizer.decode(full[:full.index(eos)])
    stop = text[len(text) // 2:len(text) // 2 + 4]
    streamed = []
    r = engine.generate([prompt], 40, stop=(stop, "never appears"),
                        on_output=lambda req, piece, ids: streamed.append(piece))[0]
    assert r.finish_reason == "stop" and r.text == text[:text.index(stop)] and "".join(streamed) == r.text
    r = engine.generate([prompt], 40, on_output=lambda req, piece, ids: streamed.append(piece))[0]
    assert r.finish_reason == "length" and r.text == text


def test_abort_frees_the_blocks(hf_checkpoint, load_ours, prompt_ids):
    _, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), None, EngineConfig(max_batch_size=4, block_size=8))
    r = Request(prompt_ids(40, seed=8), 100)
    engine.add(r)
    for _ in range(5):
        engine.step()
    assert engine.scheduler.pool.n_used == 6 and r.output
    engine.abort(r.id)
    engine.step()
    assert r.finish_reason == "abort" and engine.scheduler.pool.n_used == 0 and not engine.has_work()


def test_requests_that_cannot_be_served_are_refused(hf_checkpoint, load_ours):
    _, d = hf_checkpoint("gqa")
    engine = Engine(load_ours(d), None, EngineConfig(block_size=8, kv_cache_tokens=64))
    for prompt, max_tokens, message in [([], 5, "empty"), ([1] * 256, 1, "maximum context length is 256"),
                                        ([1] * 200, 100, "needs 300"), ([1, 400], 5, r"in \[0, 400\)"),
                                        ([1] * 60, 10, "KV cache"), ([1], -1, "at least 0")]:
        with pytest.raises(ValueError, match=message):
            engine.add(Request(prompt, max_tokens))
    for options, message in [(dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
                             (dict(logit_bias={400: 1.0}), "logit_bias"), (dict(logit_bias={3: 101.0}), "logit_bias")]:
        with pytest.raises(ValueError, match=message):
            engine.add(Request([1, 2], 4, **options))
    for seed in (2**64, -2**63 - 1):  # beyond torch.Generator's seeds: refused here, never on the engine's thread
        with pytest.raises(ValueError, match="seed must be in"):
            engine.add(Request([1, 2], 4, seed=seed))
    for seed in (2**64 - 1, -2**63):
        engine.add(Request([1, 2], 4, seed=seed))
    while engine.step():
        pass


def test_block_pool_reference_counts_and_prefix_eviction():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"x")
    assert pool.match([7, 7, 7]) == ([], [])  # digests are of token contents, "x" is not one
    from llama_fast.serving.paged_cache import block_digest
    pool.register(b, block_digest(b"", [5, 6]))
    assert pool.match([5, 6, 9]) == ([b], [block_digest(b"", [5, 6])]) and pool.refs[b] == 2
    pool.release([a, b])
    pool.release([b])
    assert pool.n_free == 3 and pool.n_used == 0
    assert pool.match([5, 6])[0] == [b] and pool.n_free == 2  # a free block is found while it is still cached
    pool.release([b])
    assert {pool.allocate(), pool.allocate(), pool.allocate()} == {1, 2, 3} and pool.allocate() is None
    assert pool.match([5, 6]) == ([], [])  # handed out again: forgotten


@pytest.mark.parametrize("kind", ["gqa", "mistral_window", "mha"])
def test_compiled_engine_matches_eager(kind, hf_checkpoint, load_ours, prompt_ids, device):
    """--compile: one dynamic graph on CPU (attend_one for decode: GQA, a sliding window, one query head per KV
    head), padded batches and block counts on CUDA."""
    _, d = hf_checkpoint(kind)
    model = load_ours(d)
    reference = copy.deepcopy(model)
    check_compiled_engine(model, lambda prompt, n: alone(reference, prompt, n), workload(prompt_ids, 7, seed=2),
                          max_batch_size=6, every=3)


def test_compiled_int8_kv_cache_matches_eager(hf_checkpoint, load_ours, prompt_ids, device):
    """--compile --kv_cache_dtype int8: the decode step's attention scales the int8 keys inside its fused sums
    (CPU); each response is what the eager int8 engine gives the request alone."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    eager = Engine(copy.deepcopy(model), None, EngineConfig(max_batch_size=1, block_size=8, kv_cache_dtype="int8"))
    check_compiled_engine(model, lambda prompt, n: eager.generate([prompt], n)[0].output,
                          workload(prompt_ids, 7, seed=3), max_batch_size=6, every=3, kv_cache_dtype="int8")


def test_start_up_runs_every_padded_decode_shape(hf_checkpoint, load_ours, prompt_ids, device):
    """CUDA's padded decode (batch and block counts to powers of two, one CUDA graph each): warm_up runs every shape
    a step can take (capture_decode_graphs), so traffic meets none for the first time; and padding changes no
    output. On CUDA compiled (the graphs captured at warm-up); on CPU eagerly, with the padding forced on."""
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    engine = Engine(model, None, EngineConfig(max_batch_size=6, block_size=8, prefill_chunk=24,
                                              compile=device == "cuda"))
    engine.runner.padded = True
    shapes, forward = [], engine.runner.decode_forward

    def recording(*tensors):
        shapes.append((tensors[0].shape[1], tensors[3].shape[1] // 8))  # (rows, blocks)
        return forward(*tensors)
    engine.runner.decode_forward = recording
    engine.warm_up()
    warmed = set(shapes)
    assert warmed >= set(engine.runner.decode_shapes()) and len(engine.runner.decode_shapes()) == 4 * 6  # 1 2 4 6
    shapes.clear()
    requests = [Request(p, n) for p, n in workload(prompt_ids, 9, seed=5)]
    run_arriving(engine, requests, every=2)
    assert shapes and set(shapes) <= warmed
    for r in requests:
        assert r.output == alone(reference, r.prompt, r.max_tokens)
    torch._dynamo.reset()


def check_compiled_engine(model, reference, workload: list, max_batch_size: int, every: int, **config):
    """The compiled engine serving the workload's requests as they arrive gives each what reference(prompt,
    max_tokens) gives it alone."""
    torch._dynamo.reset()
    config = EngineConfig(max_batch_size=max_batch_size, block_size=8, prefill_chunk=24, compile=True, **config)
    engine = Engine(model, None, config)
    requests = [Request(p, n) for p, n in workload]
    run_arriving(engine, requests, every=every)
    for r in requests:
        assert r.output == reference(r.prompt, r.max_tokens)
    torch._dynamo.reset()


def quantized_checkpoint(mode: str, hf_checkpoint, load_cpu, folder) -> Path:
    """The "gqa" fixture quantized by quantize_model, saved as quantize.py saves it (config beside it)."""
    from llama_fast.quant import qlinear as Q
    _, d = hf_checkpoint("gqa")
    state, meta = Q.quantize_model(load_cpu(d), mode, groupsize=32, progress=False)
    path = folder / f"model_{mode}.pth"
    torch.save({"quantization": meta, "state_dict": state}, path)
    (folder / "model_config.json").write_bytes((d / "model_config.json").read_bytes())
    return path


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoints(mode, hf_checkpoint, load_cpu, prompt_ids, device, tmp_path):
    from llama_fast import checkpoint
    model = checkpoint.load_model(quantized_checkpoint(mode, hf_checkpoint, load_cpu, tmp_path), device, torch.float32)
    reference = copy.deepcopy(model)
    engine = Engine(model, None, EngineConfig(max_batch_size=4, block_size=8))
    requests = [Request(p, n) for p, n in workload(prompt_ids, 6, seed=3)]
    run_arriving(engine, requests)
    for r in requests:
        assert r.output == alone(reference, r.prompt, r.max_tokens)


def test_w8a8_int8_checkpoint_compiled(hf_checkpoint, load_cpu, prompt_ids, device, tmp_path):
    """--cpu_kernels w8a8 (int8 activations, quantized per token): the compiled engine's dynamic batches give each
    request what it gets alone, since no row's rounding depends on another's."""
    from llama_fast import checkpoint
    from llama_fast.cpu import kernels as cpu_kernels
    if device != "cpu":
        pytest.skip("w8a8 is a CPU kernel")
    if not cpu_kernels.w8a8_library():
        pytest.skip("neither oneDNN's u8s8 linear nor FBGEMM's is exact on this CPU")
    path = quantized_checkpoint("int8", hf_checkpoint, load_cpu, tmp_path)
    model, reference = (checkpoint.load_model(path, "cpu", torch.float32, cpu_kernels="w8a8") for _ in range(2))
    check_compiled_engine(model, lambda prompt, n: alone(reference, prompt, n), workload(prompt_ids, 6, seed=4),
                          max_batch_size=4, every=2)


def test_an_engine_whose_model_cache_was_replaced_says_so(hf_checkpoint, load_ours, prompt_ids):
    """generate() on the Engine's own model gives it a static cache: the engine's next step refuses in words
    instead of failing inside the model (and the model generates correctly for generate())."""
    hf, d = hf_checkpoint("gqa")
    model = load_ours(d)
    engine = Engine(model, None, EngineConfig(max_batch_size=2, block_size=8))
    prompt = prompt_ids(9, seed=1)
    assert engine.generate([prompt], 5)[0].output == alone(load_ours(d), prompt, 5)
    assert alone(model, prompt, 5) == hf_greedy(hf, [prompt], 5)[0]
    with pytest.raises(RuntimeError, match="an Engine owns its model"):
        engine.generate([prompt], 5)


def test_pool_size_from_tokens_or_memory(hf_checkpoint, load_ours):
    _, d = hf_checkpoint("gqa")  # 2 layers, 2 KV heads of 16: 2 * 2 * 2 * 16 * 4 bytes = 512 bytes per token
    engine = Engine(load_ours(d), None, EngineConfig(block_size=8, kv_cache_tokens=100))
    assert engine.scheduler.pool.n_blocks == 13 + 1  # 100 tokens in whole blocks, and the padding block
    engine = Engine(load_ours(d), None, EngineConfig(block_size=8, kv_cache_gb=512 * 800 / 2**30))
    assert engine.scheduler.pool.n_blocks == 100 + 1
    engine = Engine(load_ours(d), None, EngineConfig(max_batch_size=3, block_size=8))
    assert engine.scheduler.pool.n_blocks == 3 * 256 // 8 + 1  # max_batch_size full contexts: memory allows it


def test_bench_engine_times_every_token_of_a_closed_loop(hf_checkpoint, load_ours):
    """scripts/bench_engine.py keeps N requests in flight and times each token where the engine hands it out: every
    request gets all of its max_tokens (no stop at EOS), and the steps it records computed every prompt token and
    every output token but the last, once (random prompts: no cached prefix)."""
    from scripts.bench_engine import build_parser, random_workload, report, run_closed_loop
    _, d = hf_checkpoint("gqa")
    model = load_ours(d)
    args = build_parser().parse_args(["--checkpoint_path", "unused", "--num_requests", "7", "--prompt_tokens", "5",
                                      "40", "--output_tokens", "3", "12", "--seed", "3"])
    workload = random_workload(args, model.config.vocab_size)
    jobs = [(job["prompt"], job["max_tokens"]) for job in workload]
    engine = Engine(model, None, EngineConfig(max_batch_size=3, block_size=8))
    seconds, arrival, times, steps = run_closed_loop(engine, workload, 3)
    assert sorted(map(len, times.values())) == sorted(max_tokens for _, max_tokens in jobs)
    # every prompt token and every output token but the last is computed once, as a decoding row (one token: as the
    # engine's own step times count, a prompt's last chunk of one token too) or in a longer row
    computed = sum(len(prompt) + max_tokens - 1 for prompt, max_tokens in jobs)
    assert sum(decoding + prompt for _, decoding, prompt in steps) == computed
    assert all(b > a for ts in times.values() for a, b in zip(ts, ts[1:]))
    assert f"{sum(max_tokens for _, max_tokens in jobs)} tokens" in report(seconds, arrival, times, steps)
