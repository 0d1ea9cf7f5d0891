"""Tensor parallelism on CPU with gloo: 2 processes launched with torchrun must compute what one process computes
(float32 logits within 1e-5, identical greedy tokens) for float, int8 and int4 checkpoints; indivisible models
are refused in one line; a rank that fails ends the whole launch."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TP_PROMPT as PROMPT, torchrun

import decoding
from llama_fast import checkpoint
from llama_fast.quant import qlinear as Q
from llama_fast.speculate.lookahead import LookaheadConfig, lookahead_generate
from llama_fast.speculate.speculative import DraftModel, speculative_generate
from model_config import CONFIG_NAME
from sampling import SamplingConfig
from tokenizer import load_tokenizer
import tp

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 32


def error_lines(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoint, load_cpu, tmp_path_factory) -> dict:
    """GQA (4 query heads, 2 KV heads) with an FFN of 192, which 2 processes split into whole int4 groups of 32:
    float32, int8 and int4 checkpoints; and Qwen2 (Q/K/V biases, sharded with their rows) in int4, Qwen3 (per-head
    Q/K norms, head_dim 32) in int8."""
    _, d = hf_checkpoint("gqa_tp", num_key_value_heads=2, intermediate_size=192)
    out = tmp_path_factory.mktemp("tp")
    for name in (CONFIG_NAME, "tokenizer.model"):
        shutil.copyfile(d / name, out / name)
    paths = {"float32": d / "model.pth"}
    for mode in ("int8", "int4"):
        state, meta = Q.quantize_model(load_cpu(d), mode, groupsize=32, progress=False)
        assert set(meta["layers"].values()) == {mode}  # every linear layer, the sharded ones included
        paths[mode] = out / f"model_{mode}.pth"
        torch.save({"quantization": meta, "state_dict": state}, paths[mode])
    for family, mode, extra in (("qwen2", "int4", {}), ("qwen3", "int8", {"head_dim": 32})):
        _, d = hf_checkpoint(f"{family}_tp", model_type=family, num_key_value_heads=2, intermediate_size=192, **extra)
        state, meta = Q.quantize_model(load_cpu(d), mode, groupsize=32, progress=False)
        paths[f"{family} {mode}"] = d / f"model_{mode}.pth"
        torch.save({"quantization": meta, "state_dict": state}, paths[f"{family} {mode}"])
    return paths


def test_indivisible_models_are_refused_before_sharding(hf_checkpoint, load_cpu):
    model = load_cpu(hf_checkpoint("gqa")[1])  # 4 heads, 2 KV heads, FFN 172
    with pytest.raises(ValueError, match=r"divisible by 3: n_heads \(4\), n_kv_heads \(2\), intermediate_size "
                                         r"\(172\) are not"):
        tp.apply_tp(model, rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"divisible by 4: n_kv_heads \(2\) is not"):
        tp.apply_tp(model, rank=0, world_size=4)
    assert model.layers[0].attention.wqkv.weight.shape == (8 * 16, 64)  # untouched
    assert "\n" not in str(pytest.raises(ValueError, tp.apply_tp, model, 0, 3).value)


def test_two_processes_compute_what_one_does(checkpoints, sp_tokenizer, tmp_path):
    prompt = sp_tokenizer.encode(PROMPT)
    out = tmp_path / "tp.pt"
    proc = torchrun("tests/tp_worker.py", out, ",".join(map(str, prompt)), N_NEW, *checkpoints.values())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    for kind, path in checkpoints.items():
        model = checkpoint.load_model(path, "cpu", torch.float32)
        got = results[str(path)]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]))
        assert logits.std() > 0.3  # not near-uniform: greedy tokens are decided by clear margins
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=0, msg=kind)
        torch.testing.assert_close(got["cached_logits"], logits, atol=1e-5, rtol=0, msg=kind)
        expected = decoding.generate(model, [prompt], N_NEW, SamplingConfig(temperature=0)).tokens[0]
        assert got["tokens"] == expected, kind
        # 1 of the 2 KV heads per rank
        assert got["kv_cache_shape"] == (1, 1, len(prompt) + N_NEW, model.config.head_dim), kind


def test_cli_compiled_under_torchrun(checkpoints, tmp_path):
    path = checkpoints["float32"]
    model = checkpoint.load_model(path, "cpu", torch.float32)
    tok = load_tokenizer(path.parent / "tokenizer.model")
    row = decoding.generate(model, [tok.encode(PROMPT)], N_NEW, SamplingConfig(temperature=0), tok.eos_ids).tokens[0]
    metrics = tmp_path / "metrics.json"
    proc = torchrun("generate.py", "--checkpoint_path", path, "--prompt", PROMPT, "--max_new_tokens", N_NEW,
                    "--num_samples", 1, "--temperature", 0, "--precision", "float32", "--device", "cpu",
                    "--compile", "--metrics_json", metrics)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone prints: the text once, its log lines once
    assert proc.stdout == PROMPT + tok.decode([t for t in row if t not in tok.eos_ids]) + "\n"
    assert proc.stderr.count("Compilation time") == 1 and proc.stderr.count("Average:") == 1, proc.stderr
    assert "GB/s per rank" in proc.stderr
    m = json.loads(metrics.read_text())
    # every rank reads half of each attention and FFN weight, and all of the embedding, norms and output
    sharded = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                  if name.rpartition(".")[0].endswith(("wqkv", "wo", "w13", "w2")))
    assert (m["world_size"], m["weight_bytes"]) == (2, decoding.weight_bytes(model) - sharded // 2)


def test_cli_speculative_with_a_sharded_draft(checkpoints, tmp_path):
    """The int8 copy of the target drafts (sharded too): the output is plain greedy's, and every verify step accepts
    what it accepts in one process, so the sharded draft proposed the same tokens."""
    path, draft_path = checkpoints["float32"], checkpoints["int8"]
    model = checkpoint.load_model(path, "cpu", torch.float32)
    draft = checkpoint.load_model(draft_path, "cpu", torch.float32)
    tok = load_tokenizer(path.parent / "tokenizer.model")
    prompt = tok.encode(PROMPT)
    greedy = SamplingConfig(temperature=0)
    row = decoding.generate(model, [prompt], N_NEW, greedy, tok.eos_ids).tokens[0]
    single = speculative_generate(model, [prompt], N_NEW, greedy, tok.eos_ids, proposer=DraftModel(draft),
                                  speculate_k=4)
    assert single.tokens[0] == row and sum(single.accepted) > 0
    metrics = tmp_path / "metrics.json"
    proc = torchrun("generate.py", "--checkpoint_path", path, "--draft_checkpoint_path", draft_path, "--speculate_k", 4,
                    "--prompt", PROMPT, "--max_new_tokens", N_NEW, "--num_samples", 1, "--temperature", 0,
                    "--precision", "float32", "--device", "cpu", "--metrics_json", metrics)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == PROMPT + tok.decode([t for t in row if t not in tok.eos_ids]) + "\n"
    assert json.loads(metrics.read_text())["samples"][0]["accepted"] == single.accepted


def test_cli_lookahead_under_torchrun(checkpoints, tmp_path):
    """Lookahead decoding with the target sharded: plain greedy's output, and every step accepts what it accepts in
    one process (the same guesses, the same candidate keys and values moved in each rank's half of the cache)."""
    path = checkpoints["float32"]
    model = checkpoint.load_model(path, "cpu", torch.float32)
    tok = load_tokenizer(path.parent / "tokenizer.model")
    prompt, greedy = tok.encode(PROMPT), SamplingConfig(temperature=0)
    row = decoding.generate(model, [prompt], N_NEW, greedy, tok.eos_ids).tokens[0]
    single = lookahead_generate(model, [prompt], N_NEW, greedy, tok.eos_ids, lookahead=LookaheadConfig(3, 3, 2))
    assert single.tokens[0] == row
    metrics = tmp_path / "metrics.json"
    proc = torchrun("generate.py", "--checkpoint_path", path, "--lookahead", 3, "--lookahead_ngram", 3,
                    "--lookahead_guesses", 2, "--prompt", PROMPT, "--max_new_tokens", N_NEW, "--num_samples", 1,
                    "--temperature", 0, "--precision", "float32", "--device", "cpu", "--metrics_json", metrics)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == PROMPT + tok.decode([t for t in row if t not in tok.eos_ids]) + "\n"
    assert json.loads(metrics.read_text())["samples"][0]["accepted"] == single.accepted


def test_cli_int8_kv_cache_under_torchrun(checkpoints):
    """--kv_cache_dtype int8 with the model sharded, speculating by prompt lookup: each rank keeps its half of the
    KV heads in int8 (one scale per token and head, so sharding changes no number) and the output is what one
    process decodes with the int8 cache."""
    from llama_fast.quant.kv_cache import use_int8_kv_cache
    path = checkpoints["float32"]
    model = use_int8_kv_cache(checkpoint.load_model(path, "cpu", torch.float32))
    tok = load_tokenizer(path.parent / "tokenizer.model")
    row = decoding.generate(model, [tok.encode(PROMPT)], N_NEW, SamplingConfig(temperature=0), tok.eos_ids).tokens[0]
    proc = torchrun("generate.py", "--checkpoint_path", path, "--kv_cache_dtype", "int8", "--prompt_lookup", 2,
                    "--prompt", PROMPT, "--max_new_tokens", N_NEW, "--num_samples", 1, "--temperature", 0,
                    "--precision", "float32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == PROMPT + tok.decode([t for t in row if t not in tok.eos_ids]) + "\n"


def test_eval_under_torchrun(checkpoints, tmp_path):
    """eval.py shards the same way: the perplexity of a text file from 2 processes (an int8 checkpoint, so the
    quantized sharding is covered too) is the one-process number, and rank 0 alone prints and writes."""
    import eval as E
    from conftest import english_ish
    text = tmp_path / "text.txt"
    text.write_text("\n".join(english_ish(60, seed=11)))
    path = checkpoints["int8"]
    model, tok = E.load(path, precision=torch.float32)
    single = E.text_perplexity(E.LlamaFastLM(model, tok, max_length=64), text)
    out = tmp_path / "eval.json"
    proc = torchrun("eval.py", "--checkpoint_path", path, "--text_file", text, "--max_seq_length", 64,
                    "--precision", "float32", "--device", "cpu", "--output_path", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("token_perplexity") == 1
    got = json.loads(out.read_text())["text_perplexity"]
    assert single["tokens"] > 64  # several windows
    for key in ("token_perplexity", "word_perplexity", "byte_perplexity"):
        assert got[key] == pytest.approx(single[key], rel=1e-5), key


def test_cli_refuses_int4_groups_that_do_not_split(hf_checkpoint, load_cpu, tmp_path):
    _, d = hf_checkpoint("gqa")  # FFN 172: w2's int4 groups of 32 cannot be split in two
    for name in (CONFIG_NAME, "tokenizer.model"):
        shutil.copyfile(d / name, tmp_path / name)
    state, meta = Q.quantize_model(load_cpu(d), "int4", groupsize=32, progress=False)
    torch.save({"quantization": meta, "state_dict": state}, tmp_path / "model_int4.pth")
    proc = torchrun("generate.py", "--checkpoint_path", tmp_path / "model_int4.pth", "--device", "cpu")
    assert proc.returncode != 0
    assert proc.stdout == ""
    # each process reports it (a process killed by torchrun first may not get to), in one line
    lines = error_lines(proc)
    assert lines and set(lines) == {f"error: {tmp_path / 'model_int4.pth'}: int4 feed_forward.w2 has 172 input "
                                    "features: 2 processes would split its groups of 32 (needs a multiple of 64)"}, \
        proc.stderr
    assert "File \"" + str(ROOT / "generate.py") not in proc.stderr  # no traceback from our processes


def test_a_failing_rank_ends_the_launch(checkpoints, tmp_path):
    # rank 1 raises after its first forward; rank 0 goes on into the next all-reduce, which rank 1 never joins
    proc = torchrun("tests/tp_worker.py", tmp_path / "never.pt", "1,2,3", 4, checkpoints["float32"],
                    env={"TP_WORKER_FAIL_RANK": "1", "TP_WORKER_TIMEOUT_S": "30"}, timeout=120)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    assert not (tmp_path / "never.pt").exists()


def test_serve_under_torchrun(checkpoints, load_cpu, sp_tokenizer):
    """serve.py --compile with 2 ranks: rank 0 schedules and answers HTTP, rank 1 runs the same forward passes (the
    warm-up's too: a warm-up of its own waited forever in collectives rank 0 did not make); concurrent requests
    (batched, int8 weights) answer what one process's generate() gives; SIGTERM stops both ranks."""
    import threading

    import openai
    from helpers import free_port, wait_until_healthy

    path = checkpoints["int8"]
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "serve.py",
           "--checkpoint_path", str(path), "--device", "cpu", "--precision", "float32", "--port", str(port),
           "--compile", "--tokenizer_path", str(path.parent / "tokenizer.model"), "--model_name", "tiny"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        prompts = ["The quick dog", "A small red bird sings when", "One old king"]
        answers = {}

        def ask(p):
            answers[p] = client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        model = checkpoint.load_model(path, "cpu", torch.float32)
        for p in prompts:
            expected = decoding.generate(model, [sp_tokenizer.encode(p)], 16, SamplingConfig(temperature=0),
                                         sp_tokenizer.eos_ids).tokens[0]
            expected = [t for t in expected if t not in sp_tokenizer.eos_ids]
            assert answers[p].choices[0].text == sp_tokenizer.decode(expected)
        os.kill(rank0_of(proc.pid), signal.SIGTERM)  # torchrun itself turns a signal into a traceback of its own
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Stopped" in err and "Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def rank0_of(launcher: int) -> int:
    """The pid of the RANK=0 process that torchrun (pid launcher) started."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher and b"RANK=0" in environ:
            return int(pid)
    raise LookupError("no rank 0")
