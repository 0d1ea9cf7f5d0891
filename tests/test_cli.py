"""The generate.py command line, run as a subprocess from the repository root on tiny converted checkpoints:
its output must be what generate() produces in-process (user mistakes: tests/test_mistakes.py)."""
import json
import math
from dataclasses import asdict

import pytest
from conftest import english_ish
from helpers import BASE, N_NEW, assert_ran_cleanly, run_cli

import decoding
from llama_fast.cpu.toolchain import inductor_build
from sampling import SamplingConfig
from tokenizer import load_tokenizer

PROMPTS = ["The quick dog sees a red bird", "A king", "Yesterday the old farmer walks across the river and"]


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint, load_cpu):
    _, d = hf_checkpoint("mha")
    return d, load_tokenizer(d / "tokenizer.model"), load_cpu(d)  # the command line runs with --device cpu


def expected_rows(ckpt, texts):
    """What the CLI should generate: greedy generate() in-process for the same prompts, stopping at EOS."""
    _, tok, model = ckpt
    res = decoding.generate(model, [tok.encode(t) for t in texts], N_NEW, SamplingConfig(temperature=0),
                            tok.eos_ids)
    return res.tokens


def shown(tok, row):
    return tok.decode([t for t in row if t not in tok.eos_ids])


def test_single_prompt(ckpt):
    d, tok, _ = ckpt
    row = expected_rows(ckpt, PROMPTS[:1])[0]
    assert len(row) >= 4
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", PROMPTS[0], *BASE)
    assert_ran_cleanly(proc)
    assert proc.stdout == PROMPTS[0] + shown(tok, row) + "\n"


def test_compile_and_metrics_json(ckpt, tmp_path):
    """--compile twice with a fresh inductor cache: the first run compiles the decode step, the second loads it
    from the cache (reported in the metrics), and both print what eager generate() gives."""
    d, tok, model = ckpt
    row = expected_rows(ckpt, PROMPTS[2:])[0]
    metrics = tmp_path / "metrics.json"
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for run in ("cold", "warm"):
        proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", PROMPTS[2], *BASE, "--num_samples", "2",
                       "--compile", "--metrics_json", metrics, env=cache)
        assert_ran_cleanly(proc)
        assert "Compilation time" in proc.stderr
        assert proc.stdout == (PROMPTS[2] + shown(tok, row) + "\n") * 2
        m = json.loads(metrics.read_text())
        assert (m["graphs_compiled"] > 0, m["graphs_from_cache"] > 0) == ((True, False) if run == "cold" else
                                                                          (False, True)), m

    assert set(m) == {"time_to_first_token_s", "decode_tokens_per_sec", "total_tokens_per_sec", "bandwidth_gbps",
                      "peak_memory_bytes", "compile_seconds", "graphs_from_cache", "graphs_compiled", "weight_bytes",
                      "batch_size", "device", "precision", "samples", "sampling", "world_size", "cpu_kernel",
                      "cpu_kernel_several", "float32_from", "inductor_build"}
    assert m["inductor_build"] == inductor_build()  # who built the compiled step's loops: "g++, GNU OpenMP" unless set
    assert (m["batch_size"], m["device"], m["precision"], m["world_size"]) == (1, "cpu", "float32", 1)
    assert (m["cpu_kernel"], m["cpu_kernel_several"]) == ("addmv", None)  # the only float32 kernel
    assert m["float32_from"] is None  # float32 models have no 16-bit GEMM to avoid
    assert m["sampling"] == asdict(SamplingConfig(temperature=0.0))
    assert m["compile_seconds"] > 0 and m["peak_memory_bytes"] > 0
    # weights read per decode step: everything but the (untied) embedding table, 4 bytes per float32
    n_params = sum(p.numel() for p in model.parameters())
    assert m["weight_bytes"] == 4 * (n_params - model.config.vocab_size * model.config.dim)
    assert len(m["samples"]) == 2
    for s in m["samples"]:
        assert set(s) == {"time_to_first_token_s", "decode_tokens_per_sec", "total_tokens_per_sec", "bandwidth_gbps",
                          "new_tokens", "prompt_tokens"}
        assert s["new_tokens"] == [len(row)] and s["prompt_tokens"] == [len(tok.encode(PROMPTS[2]))]
        assert s["time_to_first_token_s"] > 0 and s["decode_tokens_per_sec"] > 0
        assert s["bandwidth_gbps"] == pytest.approx(m["weight_bytes"] * s["decode_tokens_per_sec"] / 1e9)
    for k in ("time_to_first_token_s", "decode_tokens_per_sec", "total_tokens_per_sec", "bandwidth_gbps"):
        assert math.isfinite(m[k]) and m[k] == pytest.approx(sum(s[k] for s in m["samples"]) / 2)


def test_batch_of_two_prompts(ckpt, tmp_path):
    d, tok, _ = ckpt
    rows = expected_rows(ckpt, PROMPTS[:2])
    metrics = tmp_path / "m.json"
    # top-k/p and min-p leave greedy decoding alone, but must reach the sampling settings in the metrics
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *BASE,
                   "--metrics_json", metrics, "--top_k", "7", "--top_p", "0.9", "--min_p", "0.05")
    assert_ran_cleanly(proc)
    assert proc.stdout == "".join(f"--- {p}{shown(tok, r)}\n" for p, r in zip(PROMPTS[:2], rows))
    m = json.loads(metrics.read_text())
    assert m["batch_size"] == 2 and m["compile_seconds"] == 0
    assert m["sampling"] == asdict(SamplingConfig(temperature=0.0, top_k=7, top_p=0.9, min_p=0.05))
    assert m["samples"][0]["new_tokens"] == [len(r) for r in rows]
    assert m["samples"][0]["total_tokens_per_sec"] == pytest.approx(2 * m["samples"][0]["decode_tokens_per_sec"])


def test_prompt_file_and_batch_size(ckpt, tmp_path):
    d, tok, _ = ckpt
    f = tmp_path / "prompts.txt"
    f.write_text(f"{PROMPTS[1]}\n\n{PROMPTS[2]}\n")  # blank lines are skipped
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]] * 2  # --prompt first, then the file; repeated to --batch_size
    rows = expected_rows(ckpt, texts)
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", PROMPTS[0], "--prompt_file", f,
                   "--batch_size", "6", *BASE)
    assert_ran_cleanly(proc)
    assert proc.stdout == "".join(f"--- {p}{shown(tok, r)}\n" for p, r in zip(texts, rows))


def test_single_prompt_keeps_the_space_before_the_first_new_word(ckpt):
    d, tok, model = ckpt
    # a prompt whose first generated token is a word piece starting with SentencePiece's space marker
    for text in english_ish(200, seed=99):
        ids = tok.encode(text)
        first = decoding.generate(model, [ids], 1, SamplingConfig(temperature=0)).tokens[0][0]
        if tok._sp.id_to_piece(first).startswith("\u2581"):
            break
    else:
        raise AssertionError("no prompt continues with a word piece")
    row = decoding.generate(model, [ids], N_NEW, SamplingConfig(temperature=0), tok.eos_ids).tokens[0]
    full_text = tok.decode(ids + [t for t in row if t not in tok.eos_ids])
    assert full_text.startswith(text + " ")
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", text, *BASE)
    assert_ran_cleanly(proc)
    assert proc.stdout == full_text + "\n"


def test_profile_writes_a_chrome_trace(ckpt, tmp_path):
    d, _, _ = ckpt
    trace = tmp_path / "trace.json"
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", PROMPTS[0], *BASE, "--profile", trace)
    assert_ran_cleanly(proc)
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)  # the model's ops were recorded


def test_ignore_eos_generates_max_new_tokens(ckpt, tmp_path):
    d, tok, model = ckpt
    # a prompt whose greedy continuation reaches EOS early, so --ignore_eos has something to change
    for text in english_ish(400, seed=5):
        res = decoding.generate(model, [tok.encode(text)], N_NEW, SamplingConfig(temperature=0), tok.eos_ids)
        if res.stopped[0] and len(res.tokens[0]) < N_NEW:
            break
    else:
        pytest.fail("no prompt reaches EOS within the budget; the fixture model changed")
    counts = {}
    for flag in ([], ["--ignore_eos"]):
        metrics = tmp_path / f"m{len(flag)}.json"
        proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", text, *BASE, *flag, "--metrics_json", metrics)
        assert_ran_cleanly(proc)
        counts[bool(flag)] = json.loads(metrics.read_text())["samples"][0]["new_tokens"][0]
    assert counts == {False: len(res.tokens[0]), True: N_NEW}


@pytest.mark.parametrize("family", ["mistral_window", "qwen2", "qwen3"])
def test_other_families_compiled_match_hf(family, hf_checkpoint):
    """Mistral with a 24-token sliding window, Qwen2 (Q/K/V biases, tied embeddings) and Qwen3 (per-head Q/K norms,
    head_dim 32), converted from HF and run through the command line with --compile: 32 greedy tokens after a
    prompt longer than the window are HF generate()'s."""
    from conftest import hf_greedy

    hf, d = hf_checkpoint(family)
    tok = load_tokenizer(d / "tokenizer.model")
    text = " ".join(english_ish(3, seed=11))
    ids = tok.encode(text)
    assert len(ids) > 24
    ref = hf_greedy(hf, [ids], 32)[0]
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", text, *BASE, "--max_new_tokens", "32",
                   "--ignore_eos", "--compile")
    assert_ran_cleanly(proc)
    assert proc.stdout == tok.decode(ids + ref) + "\n"
