"""Tests for scripts/convert_hf_checkpoint.py, scripts/download.py and scripts/prepare.sh.

The Hugging Face checkpoints are tiny random transformers.LlamaForCausalLM models saved here in every layout the
converter reads, so nothing is downloaded: our logits must match HF's after conversion."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_fast.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent

transformers = pytest.importorskip("transformers")


def import_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conv = import_script("convert_hf_checkpoint")
download = import_script("download")

# Llama-3.2's RoPE, but scaled from a 32-token original context (not 8192) so that the scaling changes the
# angles of a 16-token test input enough to notice.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
TOKENIZER_BYTES = b"stand-in for a tiktoken ranks file\n"


def hf_model(tie=False, llama3=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        **({"rope_parameters": LLAMA3_ROPE} if llama3 else {}))
    model = transformers.LlamaForCausalLM(config).float().eval()
    # HF's init (std 0.02, norms at 1) gives near-zero logits; larger random weights make a wrong permutation,
    # a swapped norm or an untied head show up far above the tolerance.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            else:  # RMSNorm weights
                p.uniform_(0.5, 1.5)
    return model


def save_bin(model, path: Path, n_shards=1):
    """The .bin layout transformers 4 wrote with safe_serialization=False (transformers 5 only writes safetensors).
    A single file uses torch's pre-1.6 non-zip format, as the oldest checkpoints do (it cannot be mmapped)."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old versions saved this buffer
    if n_shards == 1:
        torch.save(state, path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        return
    names, weight_map = list(state), {}
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = names[i * len(names) // n_shards:(i + 1) * len(names) // n_shards]
        torch.save({k: state[k] for k in part}, path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF checkpoint dir, the HF model it holds)."""
    base, out = tmp_path_factory.mktemp("hf"), {}
    model = hf_model()
    model.save_pretrained(base / "single")
    model.save_pretrained(base / "sharded", max_shard_size="100KB")
    save_bin(model, base / "bin")
    save_bin(model, base / "bin_sharded", n_shards=3)
    out.update({name: (base / name, model) for name in ("single", "sharded", "bin", "bin_sharded")})

    tied = hf_model(tie=True, seed=1)
    tied.save_pretrained(base / "tied")
    out["tied"] = (base / "tied", tied)
    # Llama-3.2 layout: tied embeddings, llama3 RoPE scaling, tokenizer only under original/.
    llama3 = hf_model(tie=True, llama3=True, seed=2)
    llama3.save_pretrained(base / "llama3", max_shard_size="100KB")
    (base / "llama3/original").mkdir()
    (base / "llama3/original/tokenizer.model").write_bytes(TOKENIZER_BYTES)
    out["llama3"] = (base / "llama3", llama3)
    return out


def assert_same_logits(checkpoint_path: Path, hf):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = load_model(checkpoint_path, "cpu", torch.float32)
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert expected.abs().max() > 1  # not trivially small
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def run_script(*args, cwd=ROOT, env=None, timeout=120):
    cmd = list(args) if args[0].endswith(".sh") else [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


# ------------------------------------------------------------------------------------------------ converter

def test_fixture_layouts(checkpoints):
    sharded, bin_sharded, tied = checkpoints["sharded"][0], checkpoints["bin_sharded"][0], checkpoints["tied"][0]
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
    assert (bin_sharded / "pytorch_model.bin.index.json").exists()
    assert len(list(bin_sharded.glob("pytorch_model-*-of-*.bin"))) >= 2
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")  # the converter must tie it


@pytest.mark.parametrize("name", ["single", "sharded", "bin", "bin_sharded", "tied", "llama3"])
def test_convert_matches_hf(checkpoints, name):
    path, hf = checkpoints[name]
    out = conv.convert(path)
    assert out == path / "model.pth" and (path / conv.CONFIG_NAME).exists()
    assert not list(path.glob(".*.tmp*"))  # temp files renamed or removed
    assert_same_logits(out, hf)


def test_llama3_tokenizer_copied(checkpoints):
    path, _ = checkpoints["llama3"]
    conv.convert(path, force=True)  # converted before, by test_convert_matches_hf
    assert (path / "tokenizer.model").read_bytes() == TOKENIZER_BYTES
    config = json.loads((path / conv.CONFIG_NAME).read_text())
    assert config["tie_embeddings"] and config["rope_scaling"]["rope_type"] == "llama3"


def test_convert_to_safetensors(checkpoints):
    path, hf = checkpoints["bin_sharded"]
    out = conv.convert(path, "model.safetensors")
    assert_same_logits(out, hf)


def test_cli_tied_sharded_to_safetensors(checkpoints):
    # A tied model saved as safetensors stores the embedding once; the loader re-ties the head from the config.
    path, hf = checkpoints["llama3"]
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(path),
                        "--output_name", "model.safetensors")
    assert result.returncode == 0, result.stderr
    assert "output.weight" not in load_file(path / "model.safetensors")
    assert_same_logits(path / "model.safetensors", hf)


def test_cli_refuses_to_overwrite_hf_weights(checkpoints):
    path, _ = checkpoints["single"]
    before = (path / "model.safetensors").read_bytes()
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(path),
                        "--output_name", "model.safetensors")
    assert_one_line_error(result)
    assert "is the Hugging Face weights model.safetensors" in result.stderr
    assert (path / "model.safetensors").read_bytes() == before


def test_cli_replaces_a_converted_checkpoint_only_with_force(tmp_path, checkpoints):
    """A second conversion into the same folder is refused before any work, the files untouched; --force
    replaces them. A model_config.json that already says the same is not in the way (another --output_name)."""
    src, hf = checkpoints["single"]
    path = tmp_path / "ckpt"
    path.mkdir()
    for f in ("config.json", "model.safetensors"):
        (path / f).write_bytes((src / f).read_bytes())
    assert run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(path)).returncode == 0
    edited = {**json.loads((path / conv.CONFIG_NAME).read_text()), "norm_eps": 1e-6}  # a user's edit
    (path / conv.CONFIG_NAME).write_text(json.dumps(edited))
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    for name in ("model.pth", "model_copy.pth"):  # the weights, then the edited config, are in the way
        refused = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(path), "--output_name", name)
        assert_one_line_error(refused)
        assert "--force" in refused.stderr
        assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    forced = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert_same_logits(path / "model.pth", hf)
    assert not list(path.glob(".*.tmp*"))


def broken_checkpoint(tmp_path, checkpoints, problem) -> Path:
    src, _ = checkpoints["sharded" if problem == "missing shard" else "single"]
    path = tmp_path / "ckpt"
    path.mkdir()
    config = json.loads((src / "config.json").read_text())
    if problem == "no config.json":
        return path
    if problem == "unsupported model_type":
        config["model_type"] = "gpt2"
    if problem == "config without hidden_size":
        del config["hidden_size"]
    if problem == "config disagrees with the weights":  # the tensors still concatenate: only shapes tell
        config["intermediate_size"] += 16
    (path / "config.json").write_text(json.dumps(config))
    if problem == "missing tensor":
        state = load_file(src / "model.safetensors")
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, path / "model.safetensors")
    if problem == "missing shard":
        for f in src.glob("model*.safetensors*"):
            (path / f.name).write_bytes(f.read_bytes())
        sorted(path.glob("model-*-of-*.safetensors"))[-1].unlink()
    if problem == "corrupt weights":
        (path / "model.safetensors").write_bytes(b"\x00" * 100)
    if problem == "config disagrees with the weights":
        (path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return path


@pytest.mark.parametrize("problem", ["no config.json", "unsupported model_type", "config without hidden_size",
                                     "no weights", "missing tensor", "missing shard", "corrupt weights",
                                     "config disagrees with the weights"])
def test_cli_errors_are_one_line(tmp_path, checkpoints, problem):
    path = broken_checkpoint(tmp_path, checkpoints, problem)
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(path))
    assert_one_line_error(result)
    assert not (path / "model.pth").exists() and not (path / conv.CONFIG_NAME).exists()
    assert not list(path.glob(".*.tmp*"))
    expected = {"no config.json": "config.json not found", "unsupported model_type": "unsupported model_type",
                "config without hidden_size": "hidden_size", "no weights": "no model.safetensors",
                "missing tensor": "layers.1.mlp.up_proj.weight", "missing shard": "listed in model.safetensors.index.json",
                "corrupt weights": "cannot read",
                "config disagrees with the weights": "layers.0.feed_forward.w13.weight is (320, 64), the config "
                                                     "implies (352, 64)"}[problem]
    assert expected in result.stderr


# ------------------------------------------------------------------------------------------------- download

LLAMA_32_1B = [".gitattributes", "LICENSE.txt", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
               "model.safetensors", "original/consolidated.00.pth", "original/params.json",
               "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
LLAMA_2_7B = [".gitattributes", "LICENSE.txt", "README.md", "Responsible-Use-Guide.pdf", "USE_POLICY.md",
              "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
              "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
              "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
BIN_ONLY = [".gitattributes", "README.md", "config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
            "tokenizer.model", "tokenizer_config.json", "training_args.bin"]
TINYLLAMA = [".gitattributes", "README.md", "config.json", "eval_results.json", "generation_config.json",
             "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json"]
MISTRAL_V03 = [".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
               "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
               "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json",
               "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
               "tokenizer_config.json"]
GGUF_ONLY = [".gitattributes", "README.md", "config.json", "llama-2-7b.Q4_K_M.gguf"]
QWEN25_7B = [".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json", "merges.txt",
             "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
             "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "vocab.json"]


@pytest.mark.parametrize("listing, expected", [
    (LLAMA_32_1B, ["config.json", "generation_config.json", "tokenizer_config.json", "original/tokenizer.model",
                   "model.safetensors"]),
    (LLAMA_2_7B, ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model",
                  "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                  "model-00002-of-00002.safetensors"]),
    (BIN_ONLY, ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model",
                "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]),
    (TINYLLAMA, ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model",
                 "model.safetensors"]),
    (MISTRAL_V03, ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model",
                   "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                   "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]),
    (GGUF_ONLY, ["config.json"]),
    (QWEN25_7B, ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                 "model.safetensors.index.json", *(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5))]),
], ids=["llama-3.2", "llama-2-both-formats", "bin-only", "tinyllama", "mistral-consolidated", "gguf-only",
        "qwen2.5"])
def test_select_files(listing, expected):
    selected = download.select_files(listing)
    assert sorted(selected) == sorted(expected)
    assert len(selected) == len(set(selected))
    assert not any(f.endswith(".pth") or "consolidated" in f for f in selected)


class FakeConnectError(Exception):  # like httpx's ConnectError: not an OSError
    pass


def hub_exception(name):
    from huggingface_hub import errors
    cls = getattr(errors, name)
    return cls.__new__(cls)  # the HTTP errors' constructors want a response object


def fake_hub(monkeypatch, listing=None, error=None):
    import huggingface_hub
    calls = {}

    def list_repo_files(self, repo_id, token=None, **kwargs):
        if error is not None:
            raise error
        return listing

    def snapshot_download(repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_download_passes_selection_and_token(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, LLAMA_32_1B)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    download.main(["--repo_id", "meta-llama/Llama-3.2-1B", "--checkpoint_dir", str(tmp_path)])
    assert calls["repo_id"] == "meta-llama/Llama-3.2-1B" and calls["token"] == "hf_from_env"
    assert Path(calls["local_dir"]) == tmp_path / "meta-llama/Llama-3.2-1B"
    assert sorted(calls["allow_patterns"]) == sorted(download.select_files(LLAMA_32_1B))


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as e:
        download.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error:") and "\n" not in e.value.code
    return e.value.code


def test_download_gated_repo_says_how_to_fix(monkeypatch):
    fake_hub(monkeypatch, error=hub_exception("GatedRepoError"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    msg = exit_message(["--repo_id", "meta-llama/Llama-3.2-1B"])
    assert "accept the license" in msg and "huggingface.co/meta-llama/Llama-3.2-1B" in msg and "HF_TOKEN" in msg


@pytest.mark.parametrize("error, expected", [
    (lambda: hub_exception("RepositoryNotFoundError"), "not found"),
    (lambda: hub_exception("OfflineModeIsEnabled"), "HF_HUB_OFFLINE"),
    (lambda: hub_exception("LocalEntryNotFoundError"), "cannot reach"),  # snapshot_download's lost connection
    (lambda: FakeConnectError("[Errno -2] Name or service not known"), "cannot reach"),
    (lambda: PermissionError(13, "Permission denied"), "cannot write"),
])
def test_download_errors_name_the_fix(error, expected):
    msg = download.hub_error(error(), "owner/model", None)
    assert expected in msg and "\n" not in msg


def test_download_repo_without_weights(monkeypatch):
    fake_hub(monkeypatch, GGUF_ONLY)
    assert "no model*.safetensors" in exit_message(["--repo_id", "someone/llama-gguf"])


def test_download_offline_is_one_line_error(tmp_path):
    result = run_script(str(ROOT / "scripts/download.py"), "--repo_id", "nobody/no-such-model",
                        "--checkpoint_dir", str(tmp_path), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=60)
    assert_one_line_error(result)
    assert "HF_HUB_OFFLINE" in result.stderr
    assert not (tmp_path / "nobody").exists()


# -------------------------------------------------------------------------------------------------- prepare

def test_prepare_usage():
    for args in ([], ["a/b", "extra"], ["a/b", "--force", "extra"], ["--force"]):
        result = run_script(str(ROOT / "scripts/prepare.sh"), *args)
        assert result.returncode != 0 and "usage:" in result.stderr and not result.stdout


def test_prepare_runs_from_any_cwd(tmp_path):
    assert os.access(ROOT / "scripts/prepare.sh", os.X_OK)
    result = run_script(str(ROOT / "scripts/prepare.sh"), "nobody/no-such-model", cwd=tmp_path,
                        env={"HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}, timeout=60)
    assert_one_line_error(result)  # download.py was found and failed; set -e stopped before converting
    assert "HF_HUB_OFFLINE" in result.stderr
