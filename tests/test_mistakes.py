"""A catalogue of user mistakes and faults, tried through every command as a new user would make them: generate.py,
quantize.py, eval.py, the converter, download, bench.py, train_small.py, tp.py run as a command and a 2-process
torchrun. Each must end with a non-zero exit status, no traceback, exactly one "error:" line naming what is at fault,
the user's files byte-identical afterwards and no temporary file left behind.

Every case runs in a folder of its own (its "work" folder, holding any files the case makes first), in this process
through the command's main() (the rules are the library's: milliseconds each instead of a Python start-up and
`import torch`); the first case of each command also runs as a process, for the exit status and the one stderr line
exactly as a user sees them. The shared user files (a converted checkpoint, its int8 file, the Hugging Face files)
are compared once all cases have run.
Full-disk and read-only-folder cases mount a small tmpfs when the tests run as root and skip otherwise.
"""
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import english_ish

import decoding
from llama_fast.quant import qlinear as Q

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ENV = {"PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KINETO_LOG_LEVEL": "5",
       "TOKENIZERS_PARALLELISM": "false"}
GEN = ["--device", "cpu", "--precision", "float32", "--max_new_tokens", "4"]


def run(command: list, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """python COMMAND from the repository root; stdout and stderr decoded here (text mode would rewrite "\\r")."""
    proc = subprocess.run([sys.executable, *map(os.fsdecode, command)], cwd=ROOT, capture_output=True,
                          env={**os.environ, **ENV, **(env or {})}, timeout=timeout)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    return proc


def run_or_timeout(argv):
    try:
        return run(argv, timeout=120)
    except subprocess.TimeoutExpired as e:
        return e


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under `folder` (hidden temporary files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(proc, says: str, exit_code: int | None = None):
    assert proc.returncode != 0 and (exit_code is None or proc.returncode == exit_code), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr  # nothing else said: no work started
    assert says in lines[0], proc.stderr


# ------------------------------------------------------------------------------------------------ the user's files

@pytest.fixture(scope="module")
def user(hf_checkpoint, load_cpu, tmp_path_factory) -> dict:
    """The files a user owns: Hugging Face files converted to model.pth (+ model_config.json, tokenizer.model) and
    an int8 file quantized from it, in a folder of their own."""
    _, src = hf_checkpoint("mha")
    d = tmp_path_factory.mktemp("user") / "llama"
    shutil.copytree(src, d)
    state, meta = Q.quantize_model(load_cpu(d), "int8", progress=False)
    torch.save({"quantization": meta, "state_dict": state}, d / "model_int8.pth")
    (d / "wiki.txt").write_text("\n".join(english_ish(40, seed=9)))
    return {"dir": d, "model": d / "model.pth", "int8": d / "model_int8.pth", "tokenizer": d / "tokenizer.model",
            "text": d / "wiki.txt", "config": json.loads((d / "model_config.json").read_text())}


def checkpoint_in(w: Path, user: dict, config: dict | None = None, config_text: str | None = None,
                  weights: bytes | None = None, name: str = "model.pth") -> Path:
    """A checkpoint folder made in `w`: the user's model (or `weights`) with its config changed by `config` (or
    replaced by `config_text`) and its tokenizer."""
    shutil.copyfile(user["tokenizer"], w / "tokenizer.model")
    text = config_text if config_text is not None else json.dumps({**user["config"], **(config or {})})
    (w / "model_config.json").write_text(text)
    path = w / name
    if weights is None:
        shutil.copyfile(user["dir"] / name, path)
    else:
        path.write_bytes(weights)
    return path


def hf_in(w: Path, user: dict, drop: tuple = (), **config) -> Path:
    """Hugging Face files in `w`: the user's config.json with fields changed or dropped, and their weights."""
    cfg = {**json.loads((user["dir"] / "config.json").read_text()), **config}
    cfg = {k: v for k, v in cfg.items() if k not in drop}
    (w / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(user["dir"] / "model.safetensors", w / "model.safetensors")
    shutil.copyfile(user["tokenizer"], w / "tokenizer.model")
    return w


def torch_save_to(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def legacy_quantized_without(w: Path, user: dict, field: str) -> Path:
    """The user's int8 file with one field of its quantization metadata missing."""
    saved = torch.load(user["int8"], weights_only=True)
    del saved["quantization"][field]
    checkpoint_in(w, user)
    return torch_save_to(w / "model_int8.pth", saved)


class Exploit:
    """A pickle that would run a shell command if it were ever unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def yaml_task(w: Path, text: str) -> Path:
    (w / "tasks").mkdir()
    (w / "tasks" / "broken.yaml").write_text(text)
    return w / "tasks"


# ------------------------------------------------------------------------------------------------ the catalogue
# name -> (script, arguments given the user's files and the case's work folder, text the error line contains)

def G(*args):  # generate.py on the user's checkpoint unless the case names another
    return lambda u, w: ["--checkpoint_path", u["model"], *GEN, *args]


def CPU(*args):  # serve.py or bench.py on the user's checkpoint, on CPU
    return lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu", *args]


MISTAKES = {
    # ---- generate.py: arguments
    "generate/top_p_0": ("generate.py", G("--top_p", "0"), "top_p"),
    "generate/temperature_negative": ("generate.py", G("--temperature", "-1"), "temperature"),
    "generate/temperature_inf": ("generate.py", G("--temperature", "inf"), "temperature must be a finite number"),
    "generate/frequency_penalty_nan": ("generate.py", G("--frequency_penalty", "nan"),
                                       "frequency_penalty must be a finite number"),
    "generate/top_k_negative": ("generate.py", G("--top_k", "-1"), "top_k"),
    "generate/min_p_1.5": ("generate.py", G("--min_p", "1.5"), "min_p"),
    "generate/max_new_tokens_0": ("generate.py", G("--max_new_tokens", "0"), "--max_new_tokens"),
    "generate/num_samples_0": ("generate.py", G("--num_samples", "0"), "--num_samples"),
    "generate/batch_size_0": ("generate.py", G("--batch_size", "0"), "--batch_size"),
    "generate/batch_size_negative": ("generate.py", G("--batch_size", "-1"), "--batch_size"),
    "generate/batch_size_not_a_multiple": ("generate.py", G("--prompt", "a", "--prompt", "b", "--batch_size", "3"),
                                           "--batch_size"),
    "generate/speculate_k_without_draft": ("generate.py", G("--speculate_k", "3"), "--speculate_k"),
    "generate/prompt_lookup_0": ("generate.py", G("--prompt_lookup", "0"), "--prompt_lookup"),
    "generate/device_tpu": ("generate.py", G("--device", "tpu"), "--device tpu"),
    "generate/device_mps": ("generate.py", G("--device", "mps"), "--device mps"),
    "generate/device_cuda_7": ("generate.py", G("--device", "cuda:7"), "--device cuda:7"),
    "generate/w8a8_on_a_float_checkpoint": ("generate.py", G("--cpu_kernels", "w8a8"),
                                            "--cpu_kernels w8a8 is for int8 checkpoints"),
    "generate/prompt_not_utf8": ("generate.py", G("--prompt", os.fsdecode(b"caf\xe9 au lait")), "--prompt"),
    # ---- generate.py: input files
    "generate/missing_checkpoint": ("generate.py", lambda u, w: ["--checkpoint_path", w / "nowhere" / "model.pth",
                                                                 "--tokenizer_path", u["tokenizer"], *GEN],
                                    "checkpoint not found"),
    "generate/checkpoint_is_a_folder": ("generate.py", lambda u, w: ["--checkpoint_path", u["dir"], *GEN],
                                        "is a folder"),
    "generate/empty_checkpoint": ("generate.py", lambda u, w: ["--checkpoint_path", checkpoint_in(w, u, weights=b""),
                                                               *GEN], "is empty"),
    "generate/random_bytes_checkpoint": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, weights=os.urandom(30000)), *GEN], "not a PyTorch or safetensors"),
    # random bytes that start like a pickle (0x80, then a protocol number) made torch.load warn before our error
    "generate/pickle_like_random_bytes": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, weights=b"\x80\x6d" + os.urandom(30000)), *GEN],
        "not a PyTorch or safetensors"),
    "generate/truncated_checkpoint": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, weights=u["model"].read_bytes()[:20000]), *GEN], "truncated"),
    "generate/malicious_pickle": ("generate.py", lambda u, w: [
        "--checkpoint_path", torch_save_to(checkpoint_in(w, u), {"x": Exploit()}), *GEN], "weights_only"),
    "generate/checkpoint_not_a_state_dict": ("generate.py", lambda u, w: [
        "--checkpoint_path", torch_save_to(checkpoint_in(w, u), [1, 2, 3]), *GEN], "not a state dict"),
    "generate/quantized_metadata_missing_layers": ("generate.py", lambda u, w: [
        "--checkpoint_path", legacy_quantized_without(w, u, "layers"), *GEN], "layers"),
    "generate/weights_do_not_match_config": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"intermediate_size": 128}), *GEN],
        "feed_forward.w13.weight is (344, 64), the config implies (256, 64)"),
    "generate/missing_model_config": ("generate.py", lambda u, w: [
        "--checkpoint_path", torch_save_to(w / "model.pth", {}), "--tokenizer_path", u["tokenizer"], *GEN],
        "model_config.json not found"),
    "generate/config_not_json": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, config_text="{dim: 64,"), *GEN], "not valid JSON"),
    "generate/config_dim_string": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"dim": "64"}), *GEN], "dim must be an integer"),
    "generate/config_dim_0": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"dim": 0}), *GEN], "dim must be >= 1"),
    "generate/config_n_heads_negative": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"n_heads": -4}), *GEN], "n_heads must be >= 1"),
    "generate/config_heads_do_not_divide_dim": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"n_heads": 5, "n_kv_heads": 5, "head_dim": 0}), *GEN],
        "dim (64) must be a multiple of n_heads (5)"),
    "generate/config_more_active_experts_than_experts": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"n_experts": 2, "n_active_experts": 3}), *GEN],
        "n_active_experts (3) must be in 1..n_experts (2)"),
    "generate/config_unknown_field": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"hidden_size": 64}), *GEN], "unknown field hidden_size"),
    "generate/config_norm_eps_string": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"norm_eps": "1e-5"}), *GEN], "norm_eps must be a number"),
    "generate/missing_tokenizer": ("generate.py", G("--tokenizer_path", "/nonexistent/t.model"),
                                   "tokenizer file not found"),
    "generate/corrupt_tokenizer": ("generate.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--tokenizer_path", u["text"], *GEN], "cannot load tokenizer"),
    "generate/prompt_file_not_utf8": ("generate.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--prompt_file", write_bytes(w / "p.txt", b"caf\xe9\n"), *GEN],
        "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "generate/broken_tokenizer_json": ("generate.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--tokenizer_path", write(w / "tokenizer.json", '{"model": 1'), *GEN],
        "not a valid tokenizer.json"),
    "generate/missing_prompt_file": ("generate.py", G("--prompt_file", "/nonexistent/prompts.txt"),
                                     "prompt file not found"),
    "generate/blank_prompt_file": ("generate.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--prompt_file", write(w / "p.txt", "\n  \n\t\n"), *GEN],
        "has no non-blank line"),
    "generate/prompt_longer_than_context": ("generate.py", G("--prompt", " ".join(english_ish(60, seed=3))),
                                            "context"),
    # ---- generate.py: output locations, checked before the model loads
    "generate/metrics_json_in_missing_folder": ("generate.py", lambda u, w: [
        *G()(u, w), "--metrics_json", w / "no_such_folder" / "m.json"], "no_such_folder does not exist"),
    "generate/metrics_json_is_a_folder": ("generate.py", lambda u, w: [*G()(u, w), "--metrics_json", w],
                                          "is a folder"),
    "generate/profile_in_missing_folder": ("generate.py", lambda u, w: [
        *G()(u, w), "--profile", w / "no_such_folder" / "trace.json"], "--profile"),
    # ---- quantize.py
    "quantize/unknown_mode": ("quantize.py", lambda u, w: ["--checkpoint_path", u["model"], "--mode", "int3"],
                              "--mode"),
    "quantize/groupsize_48": ("quantize.py", lambda u, w: ["--checkpoint_path", u["model"], "--mode", "int4",
                                                           "--groupsize", "48"], "--groupsize"),
    "quantize/missing_checkpoint": ("quantize.py", lambda u, w: ["--checkpoint_path", w / "model.pth", "--mode",
                                                                 "int8"], "checkpoint not found"),
    "quantize/output_exists": ("quantize.py", lambda u, w: ["--checkpoint_path", u["model"], "--mode", "int8"],
                               "exists; pass --force"),
    "quantize/already_quantized": ("quantize.py", lambda u, w: ["--checkpoint_path", checkpoint_in(
        w, u, name="model_int8.pth"), "--mode", "int8"], "already quantized"),
    "quantize/calibration_for_int8": ("quantize.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), "--mode", "int8", "--calibration_file", u["text"]], "int4-gptq"),
    "quantize/gptq_without_calibration": ("quantize.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), "--mode", "int4-gptq", "--groupsize", "32"], "calibration"),
    "quantize/percdamp_nan": ("quantize.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), "--mode", "int4-gptq", "--groupsize", "32", "--calibration_file",
        u["text"], "--percdamp", "nan"], "--percdamp"),
    "quantize/device_tpu": ("quantize.py", lambda u, w: ["--checkpoint_path", checkpoint_in(w, u), "--mode", "int8",
                                                         "--device", "tpu"], "--device tpu"),
    "quantize/random_bytes_checkpoint": ("quantize.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, weights=os.urandom(30000)), "--mode", "int8"],
        "not a PyTorch or safetensors"),
    # ---- eval.py
    "eval/nothing_to_evaluate": ("eval.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu"],
                                 "nothing to evaluate"),
    "eval/unknown_task": ("eval.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu", "--tasks",
                                                   "hellaswagg", "--include_path", yaml_task(w, "task: x\n")],
                          "unknown task 'hellaswagg'"),
    "eval/malformed_task_yaml": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--tasks", "broken",
        "--include_path", yaml_task(w, "task: broken\ndataset_path: [unclosed\n")], "broken.yaml"),
    "eval/include_path_missing": ("eval.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu",
                                                           "--tasks", "x", "--include_path", w / "nope"],
                                  "--include_path"),
    "eval/missing_text_file": ("eval.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu",
                                                        "--text_file", w / "nope.txt"], "text file not found"),
    "eval/limit_negative": ("eval.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu",
                                                     "--text_file", u["text"], "--limit", "-1"], "--limit"),
    "eval/batch_size_0": ("eval.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu",
                                                   "--text_file", u["text"], "--batch_size", "0"], "--batch_size"),
    "eval/max_seq_length_past_context": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"], "--max_seq_length", "1000"],
        "exceeds the model's context"),
    "eval/output_path_in_missing_folder": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"],
        "--output_path", w / "no_such_folder" / "r.json"], "no_such_folder does not exist"),
    "eval/output_path_is_a_file_folder": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"],
        "--output_path", u["text"] / "r.json"], "wiki.txt is a file, not a folder"),
    # ---- scripts/convert_hf_checkpoint.py
    "convert/missing_folder": ("scripts/convert_hf_checkpoint.py", lambda u, w: ["--checkpoint_dir", w / "nope"],
                               "nope"),
    "convert/no_config_json": ("scripts/convert_hf_checkpoint.py", lambda u, w: ["--checkpoint_dir", w],
                               "config.json"),
    "convert/unsupported_model_type": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u, model_type="gpt2")], "model_type 'gpt2'"),
    "convert/hidden_size_string": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u, hidden_size="64")], "hidden_size"),
    "convert/missing_num_hidden_layers": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u, drop=("num_hidden_layers",))], "num_hidden_layers"),
    "convert/qwen_per_layer_sliding_window": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u, model_type="qwen2", use_sliding_window=True)], "use_sliding_window"),
    "convert/shape_mismatch": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u, intermediate_size=128)], "weights do not match"),
    "convert/output_exists": ("scripts/convert_hf_checkpoint.py", lambda u, w: ["--checkpoint_dir", u["dir"]],
                              "--force"),
    "convert/output_name_is_a_path": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u), "--output_name", "sub/model.pth"], "--output_name"),
    "convert/no_weights": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", without(hf_in(w, u), "model.safetensors")], "no model.safetensors"),
    # ---- scripts/download.py (no network here: everything must be refused before or at the Hub)
    "download/invalid_repo_id": ("scripts/download.py", lambda u, w: ["--repo_id", "not a repo!", "--checkpoint_dir",
                                                                      w], "invalid repo id"),
    "download/offline": ("scripts/download.py", lambda u, w: ["--repo_id", "meta-llama/Llama-3.2-1B",
                                                              "--checkpoint_dir", w], "HF_HUB_OFFLINE"),
    "download/checkpoint_dir_is_a_file": ("scripts/download.py", lambda u, w: [
        "--repo_id", "meta-llama/Llama-3.2-1B", "--checkpoint_dir", u["text"]], "--checkpoint_dir"),
    # ---- scripts/bench.py
    "bench/num_samples_0": ("scripts/bench.py", CPU("--num_samples", "0"), "--num_samples"),
    "bench/batch_size_0": ("scripts/bench.py", CPU("--batch_size", "0"), "--batch_size"),
    "bench/prompt_length_0": ("scripts/bench.py", CPU("--prompt_length", "0"), "--prompt_length"),
    "bench/max_new_tokens_negative": ("scripts/bench.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--max_new_tokens", "-5"], "--max_new_tokens"),
    "bench/groupsize_48": ("scripts/bench.py", CPU("--quantize", "int4", "--groupsize", "48"),
                           "--groupsize"),
    "bench/unknown_model": ("scripts/bench.py", lambda u, w: ["--model", "llama-9", "--device", "cpu"], "llama-9"),
    "bench/context_too_short": ("scripts/bench.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--prompt_length", "200", "--max_new_tokens", "100"],
        "context"),
    "bench/speculate_k_0": ("scripts/bench.py", CPU("--prompt_lookup", "2", "--speculate_k", "0"),
                            "--speculate_k"),
    "bench/lookahead_ngram_1": ("scripts/bench.py", CPU("--lookahead", "--lookahead_ngram", "1"),
                                "lookahead ngram must be >= 2"),
    "bench/lookahead_and_lookup": ("scripts/bench.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--lookahead", "--prompt_lookup", "2"], "choose one"),
    "bench_lookahead_cost/bad_config": ("scripts/bench_lookahead_cost.py", lambda u, w: [
        "--model", "stories15M", "--device", "cpu", "--configs", "4,3"], "W,N,G"),
    # ---- scripts/pad_model.py
    "pad/unknown_shape": ("scripts/pad_model.py", lambda u, w: ["--checkpoint_path", u["model"], "--shape",
                                                               "llama-9", "--out", w / "big"], "llama-9"),
    "pad/shape_too_small": ("scripts/pad_model.py", lambda u, w: ["--checkpoint_path", u["model"], "--shape",
                                                                 "stories15M", "--out", w / "big"], "cannot pad"),
    "pad/missing_checkpoint": ("scripts/pad_model.py", lambda u, w: ["--checkpoint_path", w / "nope.pth", "--shape",
                                                                    "stories110M", "--out", w / "big"], "nope.pth"),
    # ---- serve.py (each refused before the model loads)
    "serve/port_negative": ("serve.py", CPU("--port", "-1"), "--port"),
    "serve/port_too_big": ("serve.py", CPU("--port", "70000"), "--port"),
    "serve/max_batch_size_0": ("serve.py", CPU("--max_batch_size", "0"), "--max_batch_size"),
    "serve/budget_below_batch": ("serve.py", CPU("--max_batch_size", "32", "--max_num_batched_tokens", "16"),
                                 "--max_num_batched_tokens must be >= 32"),
    "serve/kv_cache_gb_nan": ("serve.py", CPU("--kv_cache_gb", "nan"), "--kv_cache_gb"),
    "serve/itl_target_negative": ("serve.py", CPU("--itl_target_ms", "-5"), "--itl_target_ms must be >= 0"),
    "serve/no_such_host": ("serve.py", CPU("--host", "10.255.255.254"), "cannot listen on 10.255.255.254"),
    "serve/chat_template_missing": ("serve.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "cpu",
                                                              "--chat_template", w / "none.jinja"], "no such file"),
    "serve/device_tpu": ("serve.py", lambda u, w: ["--checkpoint_path", u["model"], "--device", "tpu"], "tpu"),
    "serve/missing_checkpoint": ("serve.py", lambda u, w: ["--checkpoint_path", w / "nope.pth", "--device", "cpu"],
                                 "nope.pth"),
    "serve/api_key_empty": ("serve.py", CPU("--api_key", ""), "--api_key is empty"),
    "serve/api_key_not_ascii": ("serve.py", CPU("--api_key", "clé"), "printable ASCII"),
    "serve/host_empty": ("serve.py", CPU("--host", ""), "--host is empty"),
    # ---- serve.py, refused once the model is loaded (before the pool is allocated, or before serving)
    "serve/max_model_len_too_long": ("serve.py", CPU("--max_model_len", "100000"),
                                     "longer than the model's context"),
    "serve/kv_cache_below_one_context": ("serve.py", CPU("--kv_cache_tokens", "8"),
                                         "fewer than one full context"),
    "serve/kv_cache_gb_1000": ("serve.py", CPU("--kv_cache_gb", "1000"), "GiB free"),
    # ---- scripts/train_small.py
    "train/heads_do_not_divide_width": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--out", w / "out", "--dim", "64",
        "--n_heads", "5", "--n_kv_heads", "5"], "dim (64) must be a multiple of n_heads (5)"),
    "train/kv_heads_do_not_divide_heads": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--out", w / "out", "--dim", "64",
        "--n_heads", "4", "--n_kv_heads", "3"], "n_kv_heads"),
    "train/steps_0": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--out", w / "out", "--steps", "0"],
        "--steps"),
    "train/lr_nan": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--out", w / "out", "--lr", "nan"], "--lr"),
    "train/out_is_a_file": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--out", u["text"]], "--out"),
    "train/tokenizer_and_vocab_size": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--vocab_size", "400", "--out", w / "out"],
        "one of --tokenizer_path and --vocab_size"),
    "train/vocab_size_too_small": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--vocab_size", "100", "--out", w / "out"], "--vocab_size"),
    "train/init_and_vocab_size": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--init", u["model"], "--vocab_size", "400", "--out", w / "out"],
        "--init goes on with the model's own tokenizer"),
    "train/init_missing": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--init", w / "nope.pth", "--out", w / "out"],
        "--init checkpoint not found"),
    "train/init_quantized": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--init", u["int8"], "--out", w / "out",
        "--seq_len", "16"],
        "not a plain (unquantized) checkpoint"),
    "train/seed_past_64_bits": ("scripts/train_small.py", lambda u, w: [
        "--text_file", u["text"], "--tokenizer_path", u["tokenizer"], "--out", w / "out", "--seed", str(2 ** 64)],
        "--seed must be in [0, 1844"),
    "train/missing_text_file": ("scripts/train_small.py", lambda u, w: [
        "--text_file", w / "nope.txt", "--tokenizer_path", u["tokenizer"], "--out", w / "out"],
        "text file not found"),
    # ---- the second round (issue 37). Outputs are never inputs, whatever --force says (cli.check_outputs)
    "generate/profile_over_the_checkpoint": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), *GEN, "--profile", w / "model.pth"], "is the checkpoint"),
    "generate/metrics_json_over_model_config": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), *GEN, "--metrics_json", w / "model_config.json"],
        "is model_config.json beside the checkpoint"),
    "generate/metrics_json_through_a_link_to_the_tokenizer": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), *GEN, "--metrics_json", link(w / "m.json", w / "tokenizer.model")],
        "is the tokenizer"),
    "generate/metrics_json_over_the_prompt_file": ("generate.py", lambda u, w: [
        *G("--prompt_file", write(w / "p.txt", "a\n"))(u, w), "--metrics_json", w / "p.txt"], "is --prompt_file"),
    "generate/profile_and_metrics_json_one_file": ("generate.py", lambda u, w: [
        *G()(u, w), "--metrics_json", w / "m.json", "--profile", w / "m.json"], "is --metrics_json"),
    # ---- every flag acts or is refused (cli.check_flag_rules: each command's table)
    "generate/compile_prefill_without_compile": ("generate.py", G("--compile_prefill"),
                                                 "--compile_prefill needs --compile"),
    "generate/system_without_interactive": ("generate.py", G("--system", "be terse"), "--system is the system"),
    "generate/chat_template_without_interactive": ("generate.py", G("--chat_template", "llama2"),
                                                   "--chat_template is the chat format of --interactive"),
    "generate/chat_template_missing": ("generate.py", G("--interactive", "--chat_template", "llama4"),
                                       "no such file, and not one of llama2, llama3"),
    "generate/chat_template_llama3_on_sentencepiece": ("generate.py", G("--interactive", "--chat_template", "llama3"),
                                                       "needs Llama-3's tiktoken tokenizer.model"),
    "generate/chat_template_not_jinja": ("generate.py", lambda u, w: [
        *G("--interactive")(u, w), "--chat_template", write(w / "t.jinja", "{% for m in messages %}")],
        "the chat template does not parse"),
    "generate/interactive_with_prompt": ("generate.py", G("--interactive", "--prompt", "a"),
                                         "--prompt does not apply to --interactive"),
    "generate/interactive_with_num_samples_at_its_default": ("generate.py", G("--interactive", "--num_samples", "5"),
                                                             "--num_samples does not apply to --interactive"),
    "generate/inductor_without_compile": ("generate.py", G("--cpu_kernels", "inductor"),
                                          "--cpu_kernels inductor needs --compile"),
    "generate/lookahead_0": ("generate.py", G("--lookahead", "0"), "lookahead window must be >= 1"),
    "generate/max_seq_length_negative": ("generate.py", G("--max_seq_length", "-5"), "--max_seq_length must be >= 0"),
    "generate/speculate_k_5000": ("generate.py", G("--prompt_lookup", "2", "--speculate_k", "5000"),
                                  "--speculate_k 5000: a step's forward of 5001 tokens does not fit"),
    "generate/lookahead_2000": ("generate.py", G("--lookahead", "2000"), "--lookahead 2000: a step's forward"),
    "generate/seed_past_64_bits": ("generate.py", G("--seed", str(2 ** 64)), "--seed must be in [0, 1844"),
    "generate/seed_negative": ("generate.py", G("--seed", "-1"), "--seed must be in [0, 1844"),
    "generate/prompt_file_is_a_folder": ("generate.py", lambda u, w: [*G()(u, w), "--prompt_file", w],
                                         "is a folder"),
    "generate/kv_cache_past_memory": ("generate.py", G("--batch_size", str(10 ** 9), "--max_new_tokens", "100"),
                                      "needs"),
    "generate/tokenizer_smaller_than_the_model": ("generate.py", lambda u, w: [
        "--checkpoint_path", wider_vocab(w, u, 64), *GEN], "ids past 399 would decode to nothing"),
    # ---- model_config.json: no guessed context, rope_scaling as strict as the converter's (one code path)
    "generate/config_without_max_seq_len": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, config_text=json.dumps(
            {k: v for k, v in u["config"].items() if k != "max_seq_len"})), *GEN], "no max_seq_len"),
    "generate/config_rope_scaling_without_factor": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"rope_scaling": {"rope_type": "linear"}}), *GEN], "has no factor"),
    "generate/config_rope_factor_0": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"rope_scaling": {"rope_type": "linear", "factor": 0}}), *GEN],
        "rope_scaling factor must be"),
    "generate/config_rope_type_yarn": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), *GEN],
        "unsupported rope_scaling rope_type 'yarn'"),
    # ---- damage noticed on load (integrity.check_zip_crcs, check_finite)
    "generate/random_bytes_inside_the_checkpoint": ("generate.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u, weights=damaged(u["model"].read_bytes())), *GEN],
        "does not match its CRC-32"),
    "generate/nan_in_a_weight": ("generate.py", lambda u, w: [
        "--checkpoint_path", torch_save_to(checkpoint_in(w, u), with_nan(u["model"])), *GEN],
        "tensor layers.1.attention.wo.weight holds NaN or infinite values"),
    "generate/inf_in_a_safetensors_weight": ("generate.py", lambda u, w: [
        "--checkpoint_path", save_safetensors(checkpoint_in(w, u, name="model.pth").with_suffix(".safetensors"),
                                              with_nan(u["model"], float("inf"))), *GEN], "NaN or infinite"),
    # ---- eval.py
    "eval/output_path_over_the_checkpoint": ("eval.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), "--device", "cpu", "--text_file", u["text"],
        "--output_path", w / "model.pth"], "is the checkpoint"),
    "eval/output_path_over_the_text_file": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", write(w / "t.txt", "a b c"),
        "--output_path", w / "t.txt"], "is --text_file"),
    "eval/limit_with_text_file_only": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"], "--limit", "5"],
        "--limit is for --tasks"),
    "eval/num_fewshot_with_text_file_only": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"], "--num_fewshot", "3"],
        "--num_fewshot is for --tasks"),
    "eval/num_fewshot_negative": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--tasks", "x", "--num_fewshot", "-3"],
        "--num_fewshot must be >= 0"),
    "eval/text_file_not_utf8": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", write_bytes(w / "t.bin", os.urandom(999))],
        "is not UTF-8 text"),
    "eval/batch_size_past_memory": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"], "--batch_size", str(10 ** 9)],
        "scoring 1000000000 windows of 256 tokens needs"),
    "eval/text_file_is_a_folder": ("eval.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--text_file", w], "is a folder"),
    # ---- quantize.py
    "quantize/groupsize_with_int8": ("quantize.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), "--mode", "int8", "--groupsize", "7"], "--groupsize is for int4"),
    "quantize/percdamp_with_int4": ("quantize.py", lambda u, w: [
        "--checkpoint_path", checkpoint_in(w, u), "--mode", "int4", "--groupsize", "32", "--percdamp", "0.1"],
        "--percdamp is for --mode int4-gptq"),
    "quantize/output_links_to_the_checkpoint": ("quantize.py", lambda u, w: [
        "--checkpoint_path", with_link(checkpoint_in(w, u), "model_int8.pth"), "--mode", "int8", "--force"],
        "is the checkpoint"),
    "quantize/unconverted_safetensors": ("quantize.py", lambda u, w: [
        "--checkpoint_path", copy(u["dir"] / "model.safetensors", checkpoint_in(w, u).parent), "--mode", "int8"],
        "convert it first"),
    # ---- scripts/convert_hf_checkpoint.py
    "convert/output_name_tokenizer_model": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u), "--output_name", "tokenizer.model", "--force"], "is tokenizer.model"),
    "convert/output_name_model_config": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u), "--output_name", "model_config.json", "--force"], "is the converted config"),
    "convert/rope_scaling_without_factor": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u, rope_scaling={"type": "linear"})], "has no factor"),
    "convert/rope_type_yarn": ("scripts/convert_hf_checkpoint.py", lambda u, w: [
        "--checkpoint_dir", hf_in(w, u, rope_scaling={"rope_type": "yarn", "factor": 4.0})], "'yarn'"),
    # ---- scripts/bench.py, tp.py
    "bench/model_and_checkpoint_path": ("scripts/bench.py", lambda u, w: [
        "--model", "llama-2-70b", "--checkpoint_path", u["model"], "--device", "cpu"], "--model is a preset"),
    "bench/compile_prefill_without_compile": ("scripts/bench.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--device", "cpu", "--compile_prefill"], "--compile_prefill needs --compile"),
    "tp/run_as_a_command": ("tp.py", lambda u, w: [], "tp.py is the tensor-parallelism library, not a command"),
    # ---- scripts/bench_engine.py
    "bench_engine/prompt_range_reversed": ("scripts/bench_engine.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--prompt_tokens", "40", "10"], "--prompt_tokens 40 10: need 1 <= MIN"),
    "bench_engine/longer_than_the_context": ("scripts/bench_engine.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--output_tokens", "64", "100000"], "exceed the model's context"),
    "bench_engine/concurrency_0": ("scripts/bench_engine.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--concurrency", "0"], "--concurrency"),
    # ---- scripts/kv_agreement.py
    "kv_agreement/max_tokens_0": ("scripts/kv_agreement.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--prompt_file", write(w / "p.jsonl", '{"prompt": "hi"}\n'),
        "--max_tokens", "0"], "--max_tokens"),
    "kv_agreement/missing_prompt_file": ("scripts/kv_agreement.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--prompt_file", "/nonexistent/p.jsonl"], "/nonexistent/p.jsonl"),
    "kv_agreement/prompt_too_long": ("scripts/kv_agreement.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--prompt_file", write(w / "p.jsonl", '{"prompt": "hi"}\n'),
        "--max_tokens", "100000"], "more than the model's context"),
    "kv_agreement/prompt_not_text": ("scripts/kv_agreement.py", lambda u, w: [
        "--checkpoint_path", u["model"], "--prompt_file", write(w / "p.jsonl", '{"prompt": 5}\n')],
        "p.jsonl:1: not a JSON"),
}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def without(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def with_link(path: Path, name: str) -> Path:
    """`path`, with a symlink to it called `name` beside it."""
    link(path.with_name(name), path)
    return path


def copy(source: Path, folder: Path) -> Path:
    return Path(shutil.copy(source, folder))


def damaged(data: bytes) -> bytes:
    """A file with 4 KiB of random bytes in its middle (among the tensors' bytes), its length unchanged."""
    middle = len(data) // 2
    return data[:middle] + os.urandom(4096) + data[middle + 4096:]


def with_nan(model: Path, value: float = float("nan")) -> dict:
    state = torch.load(model, weights_only=True)
    state["layers.1.attention.wo.weight"][3, 5] = value
    return state


def save_safetensors(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def wider_vocab(w: Path, user: dict, extra: int) -> Path:
    """The user's model with `extra` embedding and output rows no token of its tokenizer reaches (not marked as
    padded in its model_config.json)."""
    state = torch.load(user["model"], weights_only=True)
    for name in ("tok_embeddings.weight", "output.weight"):
        state[name] = torch.cat([state[name], torch.zeros(extra, state[name].shape[1], dtype=state[name].dtype)])
    path = checkpoint_in(w, user, {"vocab_size": user["config"]["vocab_size"] + extra})
    return torch_save_to(path, state)


def prepare(name: str, user: dict, root: Path) -> tuple[Path, list, dict]:
    """The case's work folder (with any files the case makes first), its command line and the folder's snapshot."""
    w = root / name.replace("/", "-")
    w.mkdir()
    script, args, _ = MISTAKES[name]
    return w, [script, *args(user, w)], snapshot(w)


def run_in_process(argv: list, capfd, monkeypatch) -> subprocess.CompletedProcess:
    """The command's main(), called in this process as `python SCRIPT ARGS` would run it: its exit status (a
    SystemExit's string is printed to stderr with status 1, as the interpreter does) and what it wrote."""
    script, *args = argv
    module = importlib.import_module(Path(script).stem)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    try:
        code = module.main([os.fsdecode(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    if isinstance(code, str):
        code, err = 1, err + code + "\n"
    return subprocess.CompletedProcess(argv, code or 0, out, err)


@pytest.fixture(scope="module")
def user_files_before(user) -> dict:
    return snapshot(user["dir"])


@pytest.mark.parametrize("name", list(MISTAKES))
def test_mistake(name, user, user_files_before, tmp_path, capfd, monkeypatch):
    """Each mistake, in process (the rules are the library's; what a separate process adds, test_as_a_process
    checks once per command): one error line, nothing on stdout, nothing written or left behind."""
    w, argv, before = prepare(name, user, tmp_path)
    proc = run_in_process(argv, capfd, monkeypatch)
    assert_one_error_line(proc, MISTAKES[name][2])
    assert proc.stdout == "", proc.stdout
    assert snapshot(w) == before  # nothing written, nothing left behind, nothing of the user's changed


# the first mistake of each command, run as a process: the exit status and the one stderr line as a user sees them
# (no warning printed by an import, no traceback from the interpreter's own shutdown)
AS_A_PROCESS = list({MISTAKES[name][0]: name for name in reversed(MISTAKES)}.values())


@pytest.fixture(scope="module")
def process_runs(user, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mistakes")
    prepared = {name: prepare(name, user, root) for name in AS_A_PROCESS}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        runs = {name: pool.submit(run_or_timeout, argv) for name, (_, argv, _) in prepared.items()}
        return {name: (runs[name].result(), w, before) for name, (w, _, before) in prepared.items()}


@pytest.mark.parametrize("name", AS_A_PROCESS)
def test_as_a_process(name, process_runs):
    proc, w, before = process_runs[name]
    assert not isinstance(proc, subprocess.TimeoutExpired), f"still running after {proc.timeout} s"
    assert_one_error_line(proc, MISTAKES[name][2])
    assert proc.stdout == "", proc.stdout
    assert snapshot(w) == before


def test_user_files_are_untouched(user, user_files_before, process_runs):
    assert snapshot(user["dir"]) == user_files_before
    assert not (ROOT / "pwned").exists()


# ------------------------------------------------------------------------------------------------ interrupts

def start(command: list) -> subprocess.Popen:
    """The command as a terminal starts it: Ctrl-C at its default even where these tests run with it ignored (an
    ignored SIGINT is inherited, e.g. from a CI runner started in the background)."""
    return subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode("utf-8", "replace"),
                                       err.decode("utf-8", "replace"))


def assert_fault(proc: subprocess.CompletedProcess, says: str):
    """A fault met on the way (after some progress was shown): exit status 1, no traceback, the error line last
    and alone."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:] and says in lines[-1], proc.stderr


def assert_interrupted(proc: subprocess.CompletedProcess):
    """Ctrl-C: exit status 130 and one line, the last one, after whatever progress had been shown."""
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1] == "error: interrupted" and [ln for ln in lines if "error" in ln.lower()] == lines[-1:], \
        proc.stderr


@pytest.mark.parametrize("script, args", [
    ("generate.py", lambda u: ["--checkpoint_path", u["model"], *GEN]),
    ("quantize.py", lambda u: ["--checkpoint_path", u["model"], "--mode", "int4", "--groupsize", "32"]),
    ("eval.py", lambda u: ["--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"]]),
    ("scripts/convert_hf_checkpoint.py", lambda u: ["--checkpoint_dir", u["dir"], "--force"]),
    ("scripts/bench.py", lambda u: ["--checkpoint_path", u["model"], "--device", "cpu"]),
    ("serve.py", lambda u: ["--checkpoint_path", u["model"], "--device", "cpu", "--port", "0"]),
    ("scripts/train_small.py", lambda u: ["--text_file", u["text"], "--tokenizer_path", u["tokenizer"],
                                          "--out", u["dir"] / "trained"]),
])
def test_ctrl_c_while_starting_up(script, args, user, user_files_before):
    """A Ctrl-C half a second in lands while torch is being imported (or, on a fast machine, in the run)."""
    proc = start([script, *args(user)])
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert_interrupted(finish(proc))
    assert snapshot(user["dir"]) == user_files_before


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.2])
def test_ctrl_c_at_any_moment_of_loading(delay, user):
    """Ctrl-C at moments spread over the libraries' loading: one landing inside a C extension's import (numpy's,
    under torch) must not be swallowed (the run going on to exit 0) nor turned into an ImportError."""
    proc = start(["eval.py", "--checkpoint_path", user["model"], "--device", "cpu", "--text_file", user["text"]])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    assert_interrupted(finish(proc))


def test_ctrl_c_while_generating(user):
    proc = start(["generate.py", "--checkpoint_path", user["model"], *GEN, "--max_new_tokens", "200",
                  "--num_samples", "1000", "--ignore_eos"])
    assert proc.stdout.read(1)  # the first sample is being streamed
    proc.send_signal(signal.SIGINT)
    assert_interrupted(finish(proc))


def test_sigterm_while_generating(user):
    """kill (SIGTERM) ends a run like Ctrl-C does: one last line, exit status 143 (128 + 15)."""
    proc = start(["generate.py", "--checkpoint_path", user["model"], *GEN, "--max_new_tokens", "200",
                  "--num_samples", "1000", "--ignore_eos"])
    assert proc.stdout.read(1)
    proc.send_signal(signal.SIGTERM)
    done = finish(proc)
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == "error: terminated (SIGTERM)", done.stderr


@pytest.fixture(scope="module")
def big_checkpoint(user, tmp_path_factory) -> Path:
    """A 60M-parameter bfloat16 checkpoint with random weights: quantizing it takes seconds, long enough to be
    interrupted on the way."""
    from model import Transformer
    from model_config import ModelArgs

    d = tmp_path_factory.mktemp("big")
    config = ModelArgs(dim=768, n_layers=8, n_heads=12, intermediate_size=2048, vocab_size=400, max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(config).to(torch.bfloat16)
    torch.save(model.state_dict(), d / "model.pth")
    config.save(d / "model_config.json")
    shutil.copyfile(user["tokenizer"], d / "tokenizer.model")
    return d / "model.pth"


def test_ctrl_c_while_quantizing(big_checkpoint):
    before = snapshot(big_checkpoint.parent)
    proc = start(["quantize.py", "--checkpoint_path", big_checkpoint, "--mode", "int4", "--groupsize", "32"])
    while b"quantizing" not in proc.stderr.read1(4096):  # tqdm's first bar: the layers are being quantized
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert_interrupted(finish(proc))
    assert snapshot(big_checkpoint.parent) == before  # no output, no temporary file


# ------------------------------------------------------------------------------------------------ torchrun

def rank_pid(launcher_pid: int, rank: int, script: str) -> int | None:
    """The pid of torchrun's worker process with RANK=`rank` running `script` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and script.encode() in cmd:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_torchrun_rank_whose_peer_died_says_so_in_one_line(user):
    """Rank 1 is killed (as the OOM killer would) while both ranks generate: rank 0 says in one line that its peer
    stopped; torchrun then reports the failure in its own words."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "generate.py", "--checkpoint_path", user["model"], *GEN, "--max_new_tokens", "200",
                             "--num_samples", "1000", "--ignore_eos"], cwd=ROOT, env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # rank 0 is streaming: both ranks are in the decode loop
    pid = rank_pid(proc.pid, 1, "generate.py")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    done = finish(proc)
    assert done.returncode != 0
    ours = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and "another process of this torchrun launch stopped" in ours[0] or \
        ours == ["error: stopped by torchrun (SIGTERM): another process of the launch failed"], done.stderr
    # no traceback from our processes (torchrun's own follows); the slash keeps a sibling folder such as a
    # virtualenv beside the checkout (ROOT + "venv/...") from matching
    assert f'File "{ROOT}/' not in done.stderr


def test_torchrun_of_the_library_is_refused():
    """`torchrun tp.py`: the tensor-parallelism library, not a command, once did nothing and exited 0."""
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tp.py"], timeout=120)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and ours, proc.stderr
    assert all("tp.py is the tensor-parallelism library, not a command" in ln for ln in ours), proc.stderr
    assert f'File "{ROOT}/' not in proc.stderr  # no traceback of ours (torchrun's own report follows)


# ------------------------------------------------------------------------------------------------ small disks

@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size_bytes, read_only=False, files=()) -> a folder on a tmpfs of that size holding copies of
    `files` (remounted read-only if asked). Needs root; skips otherwise."""
    mounted = []

    def make(size: int, read_only: bool = False, files=()) -> Path:
        if not IS_ROOT or not shutil.which("mount"):
            pytest.skip("mounting a small tmpfs needs root")
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(d)
        for f in files:
            shutil.copyfile(f, d / Path(f).name)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", d], check=True)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", d], check=True)


def fill(folder: Path):
    """Fill a small file system to the last byte."""
    try:
        with open(folder / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError:
        pass


def size_of(*files) -> int:
    return sum(Path(f).stat().st_size for f in files)


CHECKPOINT_FILES = ("model.pth", "model_config.json", "tokenizer.model")


def test_full_disk_quantize(user, small_disk):
    files = [user["dir"] / f for f in CHECKPOINT_FILES]
    d = small_disk(size_of(*files) + 64 * 1024, files=files)  # room for a quarter of the int8 output
    before = snapshot(d)
    proc = run(["quantize.py", "--checkpoint_path", d / "model.pth", "--mode", "int8"])
    assert_fault(proc, f"error: no space left on device writing {d / 'model_int8.pth'}")
    assert snapshot(d) == before


def test_full_disk_convert(user, small_disk):
    files = [user["dir"] / f for f in ("config.json", "model.safetensors", "tokenizer.model")]
    d = small_disk(size_of(*files) + 64 * 1024, files=files)
    before = snapshot(d)
    proc = run(["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", d])
    assert_fault(proc, f"error: no space left on device writing {d / 'model.pth'}")
    assert snapshot(d) == before


@pytest.mark.parametrize("script, args", [
    ("generate.py", lambda u, d: ["--checkpoint_path", u["model"], *GEN, "--metrics_json", d / "m.json"]),
    ("eval.py", lambda u, d: ["--checkpoint_path", u["model"], "--device", "cpu", "--text_file", u["text"],
                              "--output_path", d / "results.json"]),
    # the profiler's writer reports no error: a 0-byte trace was renamed into place, then "No such file"
    ("generate.py", lambda u, d: ["--checkpoint_path", u["model"], *GEN, "--num_samples", "1", "--profile",
                                  d / "trace.json"]),
])
def test_full_disk_results(script, args, user, small_disk):
    """The run itself works; writing its results finds the disk full: one line, and no 0-byte file left."""
    d = small_disk(64 * 1024)
    fill(d)
    before = snapshot(d)
    proc = run([script, *args(user, d)])
    assert_fault(proc, "error: no space left on device writing")
    assert snapshot(d) == before


@pytest.mark.parametrize("script, args, says", [
    ("quantize.py", lambda d: ["--checkpoint_path", d / "model.pth", "--mode", "int8"], "is not writable"),
    ("generate.py", lambda d: ["--checkpoint_path", d / "model.pth", *GEN, "--metrics_json", d / "m.json"],
     "is not writable"),
    ("eval.py", lambda d: ["--checkpoint_path", d / "model.pth", "--device", "cpu", "--text_file", d / "model.pth",
                           "--output_path", d / "r.json"], "is not writable"),
])
def test_read_only_folder(script, args, says, user, small_disk, tmp_path):
    files = [user["dir"] / f for f in CHECKPOINT_FILES]
    if IS_ROOT:  # root writes through permissions: a read-only mount
        d = small_disk(size_of(*files) + 64 * 1024, read_only=True, files=files)
    else:
        d = tmp_path / "ro"
        d.mkdir()
        for f in files:
            shutil.copyfile(f, d / f.name)
        d.chmod(0o555)
    before = snapshot(d)
    assert_one_error_line(run([script, *args(d)]), says)
    assert snapshot(d) == before


# ------------------------------------------------------------------------------------------------ not mistakes

def test_legacy_torch_save_checkpoint_loads(user, tmp_path):
    """A checkpoint written by torch.save before the zip format (non-zip pickle) is read, not refused: greedy
    output equals the zip checkpoint's."""
    state = torch.load(user["model"], weights_only=True)
    legacy = checkpoint_in(tmp_path, user, weights=b"")
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    outputs = [run(["generate.py", "--checkpoint_path", path, *GEN, "--temperature", "0"])
               for path in (user["model"], legacy)]
    assert all(p.returncode == 0 for p in outputs), outputs[1].stderr
    assert outputs[0].stdout == outputs[1].stdout and outputs[0].stdout


def test_eval_output_path_is_checked_before_scoring(user, tmp_path):
    """A bad --output_path ends eval within seconds, before the model is loaded or anything scored (the text here
    would take minutes to score: a megabyte of the standard library's own source)."""
    text = tmp_path / "stdlib.txt"
    text.write_text("".join(p.read_text(errors="replace") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60]))
    t0 = time.perf_counter()
    proc = run(["eval.py", "--checkpoint_path", user["model"], "--device", "cpu", "--text_file", text,
                "--output_path", tmp_path / "no_such_folder" / "results.json"])
    assert_one_error_line(proc, "no_such_folder does not exist")  # alone: no progress bar was ever shown
    assert time.perf_counter() - t0 < 30


# ------------------------------------------------------------------------------------------------ acting, not refusing

def generate_in_process(argv: list, capfd, monkeypatch) -> subprocess.CompletedProcess:
    proc = run_in_process(["generate.py", *argv], capfd, monkeypatch)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.skipif(not IS_ROOT, reason="making a device node needs root")
def test_outputs_to_devices_and_links_are_written_in_place(user, tmp_path, capfd, monkeypatch):
    """A character device (made here like /dev/null) stays a device whether metrics or a trace go to it (the
    profiler's own writer renames), /dev/stdout prints the metrics, and a symlink stays a link whose target gets
    them: none is renamed over by an atomic write."""
    device = tmp_path / "null"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    target = tmp_path / "metrics.json"
    link(tmp_path / "latest.json", target)
    for flag, out in (("--profile", device), ("--metrics_json", device), ("--metrics_json", "/dev/stdout"),
                      ("--metrics_json", tmp_path / "latest.json")):
        proc = generate_in_process(["--checkpoint_path", user["model"], *GEN, "--num_samples", "1", flag, out],
                                   capfd, monkeypatch)
        if out == "/dev/stdout":
            assert json.loads(proc.stdout[proc.stdout.index('{\n  "time_to_first'):])["batch_size"] == 1
    assert stat.S_ISCHR(device.stat().st_mode)
    assert (tmp_path / "latest.json").is_symlink() and json.loads(target.read_text())["batch_size"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "metrics.json", "null"]  # no temp file


def test_prompt_file_runs_in_batches(user, tmp_path, capfd, monkeypatch):
    """A prompt file longer than a batch runs DEFAULT_BATCH_SIZE prompts at a time (one KV cache of that many
    rows, whatever the file's length), every prompt answered in order."""
    import generate

    lines = [f"prompt {i} the dog" for i in range(generate.DEFAULT_BATCH_SIZE * 2 + 3)]
    metrics = tmp_path / "m.json"
    sizes = []
    monkeypatch.setattr(generate, "generate", lambda model, prompts, *a, **k: sizes.append(len(prompts)) or
                        decoding.generate(model, prompts, *a, **k))
    proc = generate_in_process(["--checkpoint_path", user["model"], *GEN, "--num_samples", "1", "--temperature", "0",
                                "--prompt_file", write(tmp_path / "p.txt", "\n".join(lines)), "--metrics_json",
                                metrics], capfd, monkeypatch)
    assert sizes == [16, 16, 3]
    assert [ln.split(" the dog")[0] for ln in proc.stdout.splitlines() if ln.startswith("--- ")] == \
        [f"--- {ln.split(' the dog')[0]}" for ln in lines]
    m = json.loads(metrics.read_text())
    assert m["batch_size"] == 16 and len(m["samples"][0]["new_tokens"]) == len(lines)


def test_hf_type_key_is_read_as_rope_type():
    """HF's older `type` key means rope_type in model_config.json as in the converter's config.json."""
    from model_config import ModelArgs

    old = ModelArgs(dim=64, n_layers=1, n_heads=4, rope_scaling={"type": "linear", "factor": 2.0})
    assert old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert old == ModelArgs(dim=64, n_layers=1, n_heads=4, rope_scaling={"rope_type": "linear", "factor": 2})


def test_word_perplexity_past_a_float_is_left_out_with_a_note(tmp_path):
    """Text with few spaces (Chinese) and a high loss: exp(nll / words) overflows; the other results survive."""
    import eval as llama_eval

    class Scored:  # a model's scores of one document, as LlamaFastLM gives them
        def tok_encode(self, text, add_special_tokens=None):
            return list(range(len(text)))

        def score_documents(self, documents, disable_tqdm=False):
            return [-8.0 * len(documents[0])]

    text = "天气很好" * 200  # 800 characters, one "word"
    ppl = llama_eval.text_perplexity(Scored(), write(tmp_path / "zh.txt", text))
    assert ppl["word_perplexity"] is None and "word_perplexity left out" in ppl["notes"][0]
    assert ppl["token_perplexity"] == pytest.approx(math.exp(8.0)) and ppl["words"] == 1
    json.dumps(ppl, allow_nan=False)  # what --output_path writes is plain JSON


def test_a_checkpoint_is_verified_once_per_version(user, tmp_path, monkeypatch):
    """A verified file is not read through again on the next load (the pass costs more than a mapped load); any
    write to it makes it a new version, verified again: damage done in place is still found."""
    from llama_fast import checkpoint, integrity

    path = Path(shutil.copy(user["model"], tmp_path / "model.pth"))
    checkpoint.read_state_dict(path)
    with monkeypatch.context() as m:
        m.setattr(integrity, "check_zip_crcs", lambda *args: pytest.fail("verified twice"))
        checkpoint.read_state_dict(path)
    path.write_bytes(damaged(path.read_bytes()))  # same size, same name
    with pytest.raises(ValueError, match="does not match its CRC-32"):
        checkpoint.read_state_dict(path)


def test_a_checkpoint_we_write_is_remembered_as_verified(tmp_path, monkeypatch):
    """save_checkpoint (the converter's, quantize.py's) checks the weights before writing and remembers the file
    as verified: its first load makes no pass over it; a copy of it is a file of its own, verified on its first
    load; weights that are not finite are refused before anything is written."""
    from llama_fast import checkpoint, integrity

    passes = []
    monkeypatch.setattr(integrity, "check_zip_crcs", lambda *args: passes.append(args[0]))
    path = tmp_path / "model.pth"
    integrity.save_checkpoint({"w": torch.randn(4, 4), "b": torch.zeros(4)}, path)
    checkpoint.read_state_dict(path)
    assert passes == []
    copy = Path(shutil.copy(path, tmp_path / "copy.pth"))
    checkpoint.read_state_dict(copy)
    assert passes == [copy]
    with pytest.raises(ValueError, match="tensor w holds NaN or infinite"):
        integrity.save_checkpoint({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()


def test_load_model_reads_the_crcs_where_torch_mapped_the_tensors(user, tmp_path, monkeypatch):
    """load_model verifies while it builds the model, reading each tensor's bytes for the CRC where torch.load
    mapped them (every tensor member found there: the pages are brought in once); a damaged file is refused
    before a model is returned, and so is one the CRCs pass but whose weights are not finite."""
    import zipfile

    from llama_fast import checkpoint, integrity

    path = Path(shutil.copy(user["model"], tmp_path / "model.pth"))
    (tmp_path / "model_config.json").write_bytes((user["model"].parent / "model_config.json").read_bytes())
    state = checkpoint.read_state_dict(path, verify=False)
    with zipfile.ZipFile(path) as archive:
        n_tensors = sum("/data/" in info.filename and info.file_size > 0 for info in archive.infolist())
    found = []
    real = integrity.loaded_members
    monkeypatch.setattr(integrity, "loaded_members", lambda *args: found.append(real(*args)) or found[-1])
    integrity.check_zip_crcs(path, state)
    assert len(found[0]) == n_tensors > 0
    path.write_bytes(damaged(path.read_bytes()))
    with pytest.raises(ValueError, match="does not match its CRC-32"):
        checkpoint.load_model(path, "cpu", torch.float32)
    nan = {k: v.clone() for k, v in state.items()}
    nan["norm.weight"][3] = float("nan")
    torch.save(nan, path)
    with pytest.raises(ValueError, match="norm.weight holds NaN"):
        checkpoint.load_model(path, "cpu", torch.float32)
