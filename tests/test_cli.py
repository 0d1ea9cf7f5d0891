"""The generate.py command line, run as a subprocess from the repository root on tiny converted checkpoints:
its output must be what generate() produces in-process, and user mistakes must end in one "error:" line."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import english_ish

import decoding
from sampling import SamplingConfig
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 16
BASE = ["--max_new_tokens", str(N_NEW), "--num_samples", "1", "--temperature", "0", "--precision", "float32",
        "--device", "cpu"]
PROMPTS = ["The quick dog sees a red bird", "A king", "Yesterday the old farmer walks across the river and"]


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    # KINETO_LOG_LEVEL: a CUDA build of torch profiling on a machine with no GPU logs "ERROR ... gpuGetDeviceCount
    # failed" from its profiler library (seen with torch 2.11+cu130); not ours, and it would trip assert_ran_cleanly
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "KINETO_LOG_LEVEL": "5", **(env or {})}
    proc = subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          timeout=300)
    # bytes, decoded here: text mode would turn a generated "\r" into "\n"
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


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


def assert_ran_cleanly(proc):
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr


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
                      "batch_size", "device", "precision", "samples", "sampling", "world_size", "cpu_kernel"}
    assert (m["batch_size"], m["device"], m["precision"], m["world_size"]) == (1, "cpu", "float32", 1)
    assert m["cpu_kernel"] == "addmv"  # the only float32 kernel
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


# ---------------------------------------------------------------------------------------------- user mistakes


@pytest.fixture(scope="module")
def bad_files(ckpt, hf_checkpoint, tmp_path_factory):
    import sentencepiece as spm

    d, _, _ = ckpt
    root = tmp_path_factory.mktemp("bad")
    real = (d / "model.pth").read_bytes()
    files = {"good": d / "model.pth", "tokenizer": d / "tokenizer.model", "missing": root / "nowhere" / "model.pth"}
    for name, data in {"random": os.urandom(len(real)), "truncated": real[: len(real) // 2]}.items():
        (root / name).mkdir()
        (root / name / "model.pth").write_bytes(data)
        for f in ("model_config.json", "tokenizer.model"):
            (root / name / f).write_bytes((d / f).read_bytes())
        files[name] = root / name / "model.pth"
    (root / "noconfig").mkdir()
    for f in ("model.pth", "tokenizer.model"):
        (root / "noconfig" / f).write_bytes((d / f).read_bytes())
    files["noconfig"] = root / "noconfig" / "model.pth"
    with open(root / "big_tokenizer.model", "wb") as f:  # 500 tokens for a model with a 400-token vocabulary
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(english_ish(400, seed=5)), model_writer=f, vocab_size=500, model_type="bpe",
            byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    files["big_tokenizer"] = root / "big_tokenizer.model"
    (root / "garbage.model").write_bytes(b"this is not a tokenizer\n")
    files["garbage_tokenizer"] = root / "garbage.model"
    (root / "blank_prompts.txt").write_text("\n   \n\t\n")
    files["blank_prompts"] = root / "blank_prompts.txt"
    _, short = hf_checkpoint("short_context", max_position_embeddings=32)
    files["short"] = short / "model.pth"
    return files


LONG_PROMPT = " ".join(english_ish(6, seed=3))  # well over 32 tokens

# case -> (arguments given `files`, text the error line must contain)
MISTAKES = {
    "missing_checkpoint": (lambda f: ["--checkpoint_path", f["missing"], "--tokenizer_path", f["tokenizer"]],
                           "checkpoint not found"),
    "missing_checkpoint_and_tokenizer": (lambda f: ["--checkpoint_path", f["missing"]], "not found"),
    "random_bytes_checkpoint": (lambda f: ["--checkpoint_path", f["random"]], "cannot read checkpoint"),
    "truncated_checkpoint": (lambda f: ["--checkpoint_path", f["truncated"]], "cannot read checkpoint"),
    "missing_model_config": (lambda f: ["--checkpoint_path", f["noconfig"]], "model_config.json"),
    "tokenizer_larger_than_vocab": (lambda f: ["--checkpoint_path", f["good"], "--tokenizer_path", f["big_tokenizer"]],
                                    "500"),
    "prompt_longer_than_context": (lambda f: ["--checkpoint_path", f["short"], "--prompt", LONG_PROMPT], "context"),
    "top_p_0": (lambda f: ["--checkpoint_path", f["good"], "--top_p", "0"], "top_p"),
    "temperature_negative": (lambda f: ["--checkpoint_path", f["good"], "--temperature", "-1"], "temperature"),
    "top_k_negative": (lambda f: ["--checkpoint_path", f["good"], "--top_k", "-1"], "top_k"),
    "min_p_1.5": (lambda f: ["--checkpoint_path", f["good"], "--min_p", "1.5"], "min_p"),
    "max_new_tokens_0": (lambda f: ["--checkpoint_path", f["good"], "--max_new_tokens", "0"], "max_new_tokens"),
    "batch_size_not_a_multiple": (lambda f: ["--checkpoint_path", f["good"], "--prompt", "a", "--prompt", "b",
                                             "--batch_size", "3"], "batch_size"),
    "batch_size_negative": (lambda f: ["--checkpoint_path", f["good"], "--batch_size", "-1"], "batch_size"),
    "batch_size_0": (lambda f: ["--checkpoint_path", f["good"], "--batch_size", "0"], "batch_size"),
    "missing_tokenizer": (lambda f: ["--checkpoint_path", f["good"],
                                     "--tokenizer_path", f["missing"].parent / "t.model"], "tokenizer file not found"),
    "corrupt_tokenizer": (lambda f: ["--checkpoint_path", f["good"], "--tokenizer_path", f["garbage_tokenizer"]],
                          "cannot load tokenizer"),
    "missing_prompt_file": (lambda f: ["--checkpoint_path", f["good"], "--prompt_file", f["missing"].parent / "p.txt"],
                            "prompt file not found"),
    "frequency_penalty_nan": (lambda f: ["--checkpoint_path", f["good"], "--frequency_penalty", "nan"],
                              "frequency_penalty must be a finite number"),
    "temperature_inf": (lambda f: ["--checkpoint_path", f["good"], "--temperature", "inf"],
                        "temperature must be a finite number"),
    "blank_prompt_file": (lambda f: ["--checkpoint_path", f["good"], "--prompt_file", f["blank_prompts"]],
                          "has no non-blank line"),
    # output locations are checked before the model loads (cli.check_output_path), not after the run
    "metrics_json_in_missing_folder": (lambda f: ["--checkpoint_path", f["good"], "--metrics_json",
                                                  f["missing"].parent / "no_such_folder" / "m.json"],
                                       "no_such_folder does not exist"),
    "metrics_json_is_a_folder": (lambda f: ["--checkpoint_path", f["good"], "--metrics_json", f["good"].parent],
                                 "is a folder"),
    "profile_in_missing_folder": (lambda f: ["--checkpoint_path", f["good"], "--profile",
                                             f["missing"].parent / "no_such_folder" / "trace.json"], "--profile"),
}

def _cases():
    return list(MISTAKES)


@pytest.fixture(scope="module")
def mistake_runs(bad_files):
    """Every mistake run once, a few at a time (each is mostly a single-threaded Python start-up)."""
    from concurrent.futures import ThreadPoolExecutor

    # the case's own values come after BASE, so they win
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        runs = {name: pool.submit(run_cli, *BASE, *args(bad_files)) for name, (args, _) in MISTAKES.items()}
        return {name: run.result() for name, run in runs.items()}


@pytest.fixture
def mistake(request, mistake_runs):
    """(name, CompletedProcess) of one mistake, shared by both tests below."""
    return request.param, mistake_runs[request.param]


@pytest.mark.parametrize("mistake", _cases(), indirect=True)
def test_user_mistake_fails_with_an_error_line(mistake):
    name, proc = mistake
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:], proc.stderr
    assert MISTAKES[name][1] in lines[-1]


@pytest.mark.parametrize("mistake", _cases(), indirect=True)
def test_user_mistake_stderr_is_exactly_one_error_line(mistake):
    _, proc = mistake
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr



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
