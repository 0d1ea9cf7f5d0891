"""qlinear.py, gptq.py and quantize.py: the int8 / int4 kernels against their dequantised weights, whole-model error
bounds and saved files on --device, one int4 file packed for CPU and for the device, GPTQ against round-to-nearest
on its own objective, and the command line end to end (GPTQ, kernels and command line on CPU; tiny models)."""
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import VOCAB_SIZE, english_ish, on_cpu

import decoding
from llama_fast import checkpoint
from llama_fast.quant import gptq as G
from llama_fast.quant import qlinear as Q
from model import Transformer
from model_config import CONFIG_NAME, ModelArgs
import quantize
from sampling import SamplingConfig
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def dequantized(entries: dict, in_features: int, groupsize: int = 0) -> torch.Tensor:
    """The float weight a quantized layer's state dict entries stand for (cut back to in_features)."""
    if "scales" in entries:
        return entries["weight"].float() * entries["scales"][:, None]
    q = Q.unpack_int4(entries["weight"])
    return Q.dequantize_int4(q, entries["scales_and_zeros"].transpose(0, 1), groupsize)[:, :in_features]


def layer_entries(state: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in state.items() if k.rpartition(".")[0] == name}


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------- the kernels

def test_pack_unpack_int4_round_trip():
    q = torch.randint(0, 16, (48, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = Q.pack_int4(q)
    assert packed.shape == (48, 48) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0], q[:, 0] * 16 + q[:, 1])  # even column in the high nibble
    assert torch.equal(Q.unpack_int4(packed), q)


@pytest.mark.parametrize("in_features", [64, 172])  # 172: not a multiple of 32, the generic (non-kernel) path
def test_int8_linear_matches_dequantized_weights(in_features):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, 48, bias=False)
    entries = Q.quantize_linear(layer, "int8", 0)
    w = dequantized(entries, in_features)
    # round to nearest: within half a step of the float weight
    assert ((w - layer.weight).abs() <= entries["scales"][:, None] / 2 + 1e-7).all()
    m = Q.Int8Linear(in_features, 48)
    m.load_state_dict(entries)
    # 15 float32 tokens take the dequantize + GEMM path, 1 token the int8 kernel (when in_features allows it)
    for x in (torch.randn(3, 5, in_features), torch.randn(1, 1, in_features)):
        assert rel_err(m(x), F.linear(x, w)) <= 1e-3
    m.pack_for_device()  # rows padded to a multiple of 32 for the CPU kernel: both paths pad the input to match
    for x in (torch.randn(3, 5, in_features), torch.randn(1, 1, in_features)):
        assert rel_err(m(x), F.linear(x, w)) <= 1e-3
    for tokens in (15, Q.Int8Linear.GEMM_TOKENS[1]):  # bf16: the kernel, then dequantize + GEMM
        x = torch.randn(tokens, in_features, dtype=torch.bfloat16)
        assert rel_err(m(x).float(), F.linear(x.float(), w)) <= 1e-2


@pytest.mark.parametrize("groupsize", Q.GROUP_SIZES)
@pytest.mark.parametrize("in_features", [256, 200])  # 200: padded up to a multiple of every group size
def test_int4_linear_cpu_kernel_matches_dequantized_weights(groupsize, in_features):
    torch.manual_seed(groupsize + in_features)
    layer = nn.Linear(in_features, 48, bias=False)
    entries = Q.quantize_linear(layer, "int4", groupsize)
    w = dequantized(entries, in_features, groupsize)
    scale = entries["scales_and_zeros"][..., 0].transpose(0, 1).repeat_interleave(groupsize, 1)[:, :in_features]
    assert ((w - layer.weight).abs() <= scale / 2 + 1e-6).all()
    m = Q.Int4Linear(in_features, 48, groupsize)
    m.load_state_dict(entries)
    m.pack_for_device()
    assert m.kernel == "cpu" and m.padded_in == -(-in_features // groupsize) * groupsize
    # 15 float32 tokens take the dequantize-then-GEMM path, 1 token and bf16 the int4 kernel
    for x in (torch.randn(3, 5, in_features), torch.randn(1, 1, in_features)):
        y = m(x)
        assert y.shape == (*x.shape[:-1], 48)
        assert rel_err(y, F.linear(x, w)) <= 1e-3
        padded = F.pad(x.reshape(-1, in_features), (0, m.padded_in - in_features))
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(padded, m.weight, groupsize, m.scales_and_zeros)
        assert rel_err(y.reshape(kernel.shape), kernel) <= 1e-5
    # bf16: the kernel below GEMM_TOKENS tokens, dequantize + bf16 GEMM from there on (prefill)
    for tokens in (15, Q.Int4Linear.GEMM_TOKENS[1]):
        x = torch.randn(tokens, in_features, dtype=torch.bfloat16)
        assert rel_err(m(x).float(), F.linear(x.float(), w)) <= 1e-2


def test_quantized_linears_compile_on_the_kernel_and_the_gemm_path():
    """A compiled prefill (dynamic shapes) crosses GEMM_TOKENS: both paths trace and agree with eager."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 64, bias=False)
    for kind, module in (("int8", Q.Int8Linear(256, 64)), ("int4", Q.Int4Linear(256, 64, 32))):
        module.load_state_dict(Q.quantize_linear(layer, kind, 32))
        module.to(torch.bfloat16).pack_for_device()
        compiled = torch.compile(module, fullgraph=True, dynamic=True)
        for tokens in (3, module.GEMM_TOKENS[1] + 5):
            x = torch.randn(tokens, 256, dtype=torch.bfloat16)
            assert rel_err(compiled(x).float(), module(x).float()) <= 1e-2


@pytest.mark.parametrize("shape", [(80, 64), (5632, 256), (48, 96), (16, 32), (4128, 64)])
def test_unpack_int4_cpu_inverts_the_cpu_packing(shape):
    """The CPU kernel's private layout, read back: full row blocks and a short last one."""
    assert Q.cpu_int4_block() in (64, 32)
    codes = torch.randint(0, 16, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(Q.unpack_int4_cpu(packed, Q.cpu_int4_block()).int(), codes)


def test_gptq_without_correlations_is_round_to_nearest():
    """With H = I no error is passed on, so GPTQ must give exactly the round-to-nearest codes and parameters:
    the same format and conventions as the runtime's."""
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    for groupsize in Q.GROUP_SIZES:
        codes, qparams = G.gptq_quantize(w, torch.eye(256), groupsize, blocksize=64)
        rtn = Q.int4_qparams(w, groupsize)
        assert torch.equal(qparams, rtn) and torch.equal(codes, Q.quantize_int4(w, rtn, groupsize))


def test_gptq_blocks_do_not_change_the_result():
    """The lazy block updates are a reordering of the same arithmetic: any block size, also one that cuts groups
    in two (the group's parameters then need the pending update of its columns past the block), gives the
    result of one block up to float rounding."""
    torch.manual_seed(0)
    K = 256
    X = torch.randn(512, K) @ (torch.eye(K) + 0.5 * torch.randn(K, K) / K ** 0.5)  # correlated inputs
    H, w = 2 * X.T @ X / len(X), torch.randn(32, K)
    for groupsize in (32, 128):
        ref_codes, ref_qparams = G.gptq_quantize(w, H, groupsize, blocksize=K)
        for blocksize in (16, 48, 100):
            codes, qparams = G.gptq_quantize(w, H, groupsize, blocksize=blocksize)
            assert (codes != ref_codes).float().mean() < 0.005
            torch.testing.assert_close(qparams, ref_qparams, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------ whole random models

def quantized_in_memory(model, state, meta):
    m = copy.deepcopy(model)
    Q.swap_in_quantized(m, meta["layers"], meta["groupsize"] or 0)
    m.load_state_dict(state)
    return Q.pack_for_device(m)


def save_quantized(directory: Path, state, meta, config: ModelArgs, name="q.pth") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_NAME)
    state = {k: v.cpu() for k, v in state.items()}  # as quantize.py writes it, whichever device quantized it
    torch.save({"quantization": meta, "state_dict": state}, directory / name)
    return directory / name


@pytest.mark.parametrize("mode,groupsize", [("int8", 0), ("int4", 32), ("int4", 128), ("int4", 256)])
def test_model_logit_error_is_bounded_by_the_weight_errors(hf_checkpoint, load_ours, prompt_ids, device, mode,
                                                           groupsize):
    """Bound: ‖Δlogits‖ / ‖logits‖ ≤ Σ_l ‖ΔW_l‖_F / ‖W_l‖_F over the quantized layers. To first order the logit
    error is a sum of one term per layer; a layer with relative weight error ε turns isotropic inputs (random
    init) into outputs with relative error ≈ ε, and its output is one part of the residual stream or of the
    logits, so its term is at most about ε of the logits; the triangle inequality adds the layers up."""
    _, d = hf_checkpoint("mha")
    model = load_ours(d)
    state, meta = Q.quantize_model(model, mode, groupsize, progress=False)
    kind = "int8" if mode == "int8" else "int4"
    quantized = [n for n, decision in meta["layers"].items() if decision == kind]
    assert len(quantized) >= 5
    bound = sum(rel_err(dequantized(layer_entries(state, n), model.get_submodule(n).in_features, groupsize),
                        model.get_submodule(n).weight) for n in quantized)
    idx = torch.tensor([prompt_ids(48, seed) for seed in range(4)], device=device)
    with torch.no_grad():
        ref, out = model(idx), quantized_in_memory(model, state, meta)(idx)
    err = rel_err(out, ref)
    print(f"\n{mode} g{groupsize}: relative logit error {err:.4f}, bound {bound:.4f}")
    assert 0 < err <= bound


@pytest.mark.parametrize("name,mode,groupsize,quantize_output", [
    ("mha", "int8", 0, True), ("mha", "int4", 32, True), ("tied", "int4", 64, True), ("gqa", "int4", 128, False),
    ("tied", "int8", 0, False)])
def test_saved_file_loads_to_the_same_model(hf_checkpoint, load_ours, prompt_ids, tmp_path, device, name, mode,
                                            groupsize, quantize_output):
    _, d = hf_checkpoint(name)
    model = load_ours(d)
    state, meta = Q.quantize_model(model, mode, groupsize, quantize_output, progress=False)
    assert ("output" in meta["layers"]) == quantize_output
    if mode == "int4":  # intermediate_size 172: w13 has 344 rows, not a multiple of 16, so it stays float
        assert meta["layers"]["layers.0.feed_forward.w13"].startswith("kept in torch.float32: out_features 344")
    path = save_quantized(tmp_path, state, meta, model.config)
    loaded = checkpoint.load_model(path, device, torch.float32)
    assert loaded.quantization == meta
    idx = torch.tensor([prompt_ids(20, 1), prompt_ids(20, 2)], device=device)
    with torch.no_grad():
        assert torch.equal(loaded(idx), quantized_in_memory(model, state, meta)(idx))


# CUDA's int4 kernel takes bfloat16 activations and group parameters and returns bfloat16: each int4 layer (9 in the
# model below) rounds its input, its scales and zeros and its output to 8 significant bits (unit roundoff
# 2^-8 ≈ 0.4%), so the device's logits differ from CPU's by about a percent. A wrong tile layout or nibble order
# gives errors of order 1.
INT4_DEVICE_RTOL = 3e-2


@pytest.mark.parametrize("groupsize", [32, 128])  # CUDA packs these with 4 and with 8 inner k-tiles
def test_one_int4_file_packed_for_cpu_and_for_the_device(hf_checkpoint, load_cpu, prompt_ids, tmp_path, device,
                                                         groupsize):
    """The same int4 file loaded twice: packed for the CPU kernel and packed for the device's. On CPU that is the
    same model twice (identical logits); on CUDA another kernel and layout (_weight_int4pack_mm), whose logits must
    agree with the CPU-packed model's within INT4_DEVICE_RTOL (relative, over the whole logits tensor)."""
    _, d = hf_checkpoint("int4_every_layer", intermediate_size=192)  # 384 and 64 rows: every layer takes int4
    state, meta = Q.quantize_model(load_cpu(d), "int4", groupsize, progress=False)
    assert set(meta["layers"].values()) == {"int4"}
    path = save_quantized(tmp_path, state, meta, ModelArgs.load(d / CONFIG_NAME))
    for_cpu, for_device = (checkpoint.load_model(path, where, torch.float32) for where in ("cpu", device))

    def kernels(m):
        return {layer.kernel for layer in m.modules() if isinstance(layer, Q.Int4Linear)}

    assert kernels(for_cpu) == {"cpu"} and kernels(for_device) == {torch.device(device).type}
    idx = torch.tensor([prompt_ids(40, seed) for seed in (1, 2)])
    with torch.no_grad():
        ref, got = for_cpu(idx), for_device(idx.to(device)).cpu()
    assert got.dtype == ref.dtype == torch.float32 and ref.std() > 0.5
    if on_cpu(device):
        assert torch.equal(got, ref)
    else:
        err = rel_err(got, ref)
        print(f"\nint4 g{groupsize}: {device} vs CPU kernel, relative logit difference {err:.2e}")
        assert err <= INT4_DEVICE_RTOL


# ---------------------------------------------------------------------------------------- GPTQ on a trained model

CONFIG = dict(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB_SIZE, intermediate_size=192, max_seq_len=256)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sp_model_path, sp_tokenizer):
    """A tiny Llama trained for a few seconds on generated English, so its activations have the structure GPTQ
    exploits (random-init activations are nearly white noise), saved as a checkpoint directory."""
    torch.manual_seed(0)
    config = ModelArgs(**CONFIG)
    model = Transformer(config)
    ids = torch.tensor(sp_tokenizer.encode(" ".join(english_ish(1500, seed=7))))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g).tolist()
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.4 * losses[0]  # it learned something
    model.eval().requires_grad_(False)
    d = tmp_path_factory.mktemp("trained")
    config.save(d / CONFIG_NAME)
    torch.save(model.state_dict(), d / "model.pth")
    shutil.copyfile(sp_model_path, d / "tokenizer.model")
    return model, d


@pytest.fixture(scope="module")
def calibration(sp_tokenizer):
    """16 sequences of 64 tokens of text the model was not trained on."""
    text = " ".join(english_ish(300, seed=99))
    sequences = G.calibration_sequences(sp_tokenizer, text, 16, 64)
    assert len(sequences) == 16 and all(len(s) == 64 and s[0] == sp_tokenizer.bos_id for s in sequences)
    return sequences


def test_block_by_block_forward_is_the_model_forward(trained, calibration):
    model, _ = trained
    idx = torch.tensor([calibration[0]])
    with torch.no_grad():
        xs = [model.tok_embeddings(idx)]
        for block in model.layers:
            xs = list(G.run_block(block, xs, model))
        torch.testing.assert_close(model.output(model.norm(xs[0])), model(idx), rtol=0, atol=1e-6)


def calibration_inputs(model, gptq_state, names, sequences, groupsize) -> dict:
    """The inputs each layer saw during GPTQ's calibration, gathered independently with the model's own forward:
    block i's layers see the outputs of blocks < i quantized (their dequantised weights) and block i in float;
    the output projection sees all blocks quantized."""
    m = copy.deepcopy(model)
    inputs = {}
    for prefix in [f"layers.{i}." for i in range(model.config.n_layers)] + ["output"]:
        group = [n for n in names if n.startswith(prefix)]
        hooks = [m.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: inputs.setdefault(n, []).append(args[0].reshape(-1, mod.in_features)))
            for n in group]
        with torch.no_grad():
            for s in sequences:
                m(torch.tensor([s]))
        for h in hooks:
            h.remove()
        for n in group:
            layer = m.get_submodule(n)
            layer.weight.data = dequantized(layer_entries(gptq_state, n), layer.in_features, groupsize)
    return {n: torch.cat(x) for n, x in inputs.items()}


@pytest.mark.parametrize("groupsize", [32, 128])  # 128: K=64 layers pad half of each group with dead columns
def test_gptq_beats_round_to_nearest_on_every_layer(trained, calibration, groupsize):
    """GPTQ's objective is ‖XWᵀ − XŴᵀ‖_F on the calibration inputs X; it must be lower than round-to-nearest's at
    the same group size for every quantized layer."""
    model, _ = trained
    state, meta = G.gptq_quantize_model(copy.deepcopy(model), calibration, groupsize, progress=False)
    names = list(meta["layers"])
    assert names == Q.linear_names(model, True) and set(meta["layers"].values()) == {"int4"}
    X = calibration_inputs(model, state, names, calibration, groupsize)
    print(f"\ng{groupsize}: ‖XWᵀ − XŴᵀ‖_F  GPTQ / RTN")
    for n in names:
        layer = model.get_submodule(n)
        w, x = layer.weight, X[n]
        gptq = (x @ (w - dequantized(layer_entries(state, n), layer.in_features, groupsize)).T).norm().item()
        rtn_w = dequantized(Q.quantize_linear(layer, "int4", groupsize), layer.in_features, groupsize)
        rtn = (x @ (w - rtn_w).T).norm().item()
        print(f"  {n:26s} {gptq:8.3f} / {rtn:8.3f} = {gptq / rtn:.3f}")
        assert gptq < rtn, n


@pytest.mark.parametrize("percdamp,blocksize,groupsize", [(0.1, 32, 64), (0.001, 16, 256), (0.01, 128, 32)])
def test_gptq_settings_keep_the_runtime_format(trained, calibration, tmp_path, sp_tokenizer, percdamp, blocksize,
                                               groupsize):
    """Whatever the settings, the file loads through checkpoint.load_model, its kernels compute with exactly the
    weights GPTQ chose (those it left in the calibration model), and it generates."""
    model, _ = trained
    m = copy.deepcopy(model)
    state, meta = G.gptq_quantize_model(m, calibration[:8], groupsize, True, percdamp, blocksize, progress=False)
    assert meta["gptq"] == {"percdamp": percdamp, "blocksize": blocksize, "act_order": False,
                            "calibration_sequences": 8, "calibration_tokens": 8 * 64}
    for n in meta["layers"]:
        layer = m.get_submodule(n)
        w = dequantized(layer_entries(state, n), layer.in_features, groupsize)
        if n != "output":  # the blocks calibrate the next ones with their quantized weights
            assert torch.equal(layer.weight, w)
        layer.weight.data = w
    loaded = checkpoint.load_model(save_quantized(tmp_path, state, meta, model.config), "cpu", torch.float32)
    idx = torch.tensor(calibration[8:10])
    with torch.no_grad():
        assert rel_err(loaded(idx), m(idx)) < 1e-4
    prompt = sp_tokenizer.encode("The old farmer")
    res = decoding.generate(loaded, [prompt], 8, SamplingConfig(temperature=0))
    assert len(res.tokens[0]) == 8


def calibration_task(root: Path, pages: list, data_file: Path | None = None) -> Path:
    """A wikitext-format lm-eval task (lm-eval's own YAML, included) over local JSONL pages: its path, which
    lm-eval takes as a task name."""
    import lm_eval
    data_file = data_file or root / "pages.jsonl"
    if pages:
        data_file.write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    wikitext = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    yaml = root / "calib_wikitext.yaml"
    yaml.write_text(f"include: {wikitext}\ntask: calib_wikitext\ntag: []\ndataset_path: json\ndataset_name: null\n"
                    f"dataset_kwargs:\n  data_files:\n    train: {data_file}\n    validation: {data_file}\n"
                    f"    test: {data_file}\n")
    return yaml


def test_calibration_tasks_read_lm_eval_documents(tmp_path):
    """Real lm-eval: the training documents of a wikitext-format task, joined, up to max_chars."""
    task = calibration_task(tmp_path, [f"Page {i} text." for i in range(100)])
    text, source = G.read_calibration_text(None, [str(task)], max_chars=40)
    assert (text, source) == ("Page 0 text.\n\nPage 1 text.\n\nPage 2 text.\n\nPage 3 text.", f"lm_eval:{task}")


def test_calibration_tasks_without_their_data_is_one_error_line(tmp_path):
    task = calibration_task(tmp_path, [], data_file=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError) as e:
        G.read_calibration_text(None, [str(task)], max_chars=1000)
    message = str(e.value)
    assert message.startswith(f"cannot load the data of --calibration_tasks {task} offline (") and "\n" not in message
    assert message.endswith("); use --calibration_file with a local text file (e.g. WikiText) instead")


# ------------------------------------------------------------------------------------------------- command line

N_NEW = 12
PROMPT = "The quick dog sees a red bird"


def popen(script, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(proc) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode("utf-8"), err.decode("utf-8"))


def run_all(*commands) -> list:
    """Run (script, args...) commands side by side (each is one mostly single-threaded process)."""
    return [finish(p) for p in [popen(*c) for c in commands]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cli(trained, tmp_path_factory):
    """The trained checkpoint in a directory of its own, quantized by the command line three ways."""
    _, src = trained
    d = tmp_path_factory.mktemp("cli")
    for f in src.iterdir():
        shutil.copyfile(f, d / f.name)
    calib = tmp_path_factory.mktemp("calib") / "wiki.txt"
    calib.write_text("\n".join(english_ish(200, seed=99)) + "\n")
    before = sha256(d / "model.pth")
    ckpt = ("--checkpoint_path", d / "model.pth")
    procs = run_all(("quantize.py", *ckpt, "--mode", "int8"),
                    ("quantize.py", *ckpt, "--mode", "int4", "--groupsize", "32"),
                    ("quantize.py", *ckpt, "--mode", "int4-gptq", "--groupsize", "64", "--calibration_file", calib,
                     "--calibration_limit", "8", "--calibration_seq_length", "64", "--percdamp", "0.02",
                     "--blocksize", "32"))
    return d, calib, before, procs


def test_cli_writes_beside_the_input_and_leaves_it_alone(cli):
    d, _, before, procs = cli
    for proc, name in zip(procs, ["model_int8.pth", "model_int4.g32.pth", "model_int4-gptq.g64.pth"]):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout.startswith(f"wrote {d / name} ")
    assert sorted(f.name for f in d.iterdir()) == ["model.pth", "model_config.json", "model_int4-gptq.g64.pth",
                                                   "model_int4.g32.pth", "model_int8.pth", "tokenizer.model"]
    assert sha256(d / "model.pth") == before
    assert "calibrated on 8 sequences (512 tokens)" in procs[2].stderr


def test_cli_refuses_to_overwrite_without_force(cli):
    d, _, before, _ = cli
    out = d / "model_int8.pth"
    old = sha256(out)
    refused, forced = run_all(("quantize.py", "--checkpoint_path", d / "model.pth", "--mode", "int8"),
                              ("quantize.py", "--checkpoint_path", d / "model.pth", "--mode", "int8", "--force"))
    assert refused.returncode != 0 and refused.stderr.strip() == f"error: output {out} exists; pass --force to replace it"
    assert forced.returncode == 0, forced.stderr
    assert sha256(out) == old  # quantization is deterministic: the same bytes again
    assert sha256(d / "model.pth") == before and not list(d.glob(".*tmp*"))


def test_cli_metadata(cli):
    d, calib, _, _ = cli
    names = Q.linear_names(Transformer(ModelArgs(**CONFIG)), True)
    for file, mode, groupsize in [("model_int8.pth", "int8", None), ("model_int4.g32.pth", "int4", 32),
                                  ("model_int4-gptq.g64.pth", "int4-gptq", 64)]:
        meta = torch.load(d / file, weights_only=True)["quantization"]
        assert (meta["mode"], meta["groupsize"], meta["quantize_output"]) == (mode, groupsize, True)
        assert meta["layers"] == {n: "int8" if mode == "int8" else "int4" for n in names}
        assert meta["source"] == str(d / "model.pth")
        assert ("gptq" in meta) == (mode == "int4-gptq")
    assert meta["gptq"] == {"percdamp": 0.02, "blocksize": 32, "act_order": False, "calibration_sequences": 8,
                            "calibration_tokens": 512, "calibration_source": str(calib),
                            "calibration_seq_length": 64}


def test_cli_quantized_files_generate(cli):
    """int8 in float32 without compiling must print what generate() gives in-process for the loaded file; int4
    (compiled), int8 (compiled) and int4-gptq (bfloat16) must run cleanly and generate."""
    d, _, _, _ = cli
    tok = load_tokenizer(d / "tokenizer.model")
    base = ["--prompt", PROMPT, "--max_new_tokens", N_NEW, "--num_samples", 1, "--temperature", 0, "--device", "cpu"]
    runs = [("model_int8.pth", "float32", False), ("model_int4.g32.pth", "float32", True),
            ("model_int8.pth", "float32", True), ("model_int4-gptq.g64.pth", "bfloat16", False)]
    procs = run_all(*[("generate.py", "--checkpoint_path", d / f, *base, "--precision", p, *(["--compile"] * c))
                      for f, p, c in runs])
    for proc, (_, _, compiled) in zip(procs, runs):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr and "error" not in proc.stderr.lower(), \
            proc.stderr
        assert proc.stdout.startswith(PROMPT) and len(proc.stdout) > len(PROMPT) + 1
        assert ("Compilation time" in proc.stderr) == compiled
    model = checkpoint.load_model(d / "model_int8.pth", "cpu", torch.float32)
    row = decoding.generate(model, [tok.encode(PROMPT)], N_NEW, SamplingConfig(temperature=0), tok.eos_ids).tokens[0]
    assert procs[0].stdout == PROMPT + tok.decode(tok.encode(PROMPT) + [t for t in row if t not in tok.eos_ids])[
        len(tok.decode(tok.encode(PROMPT))):] + "\n"


def test_cli_gptq_keeps_the_stored_dtypes(trained, tmp_path):
    """Calibration runs in float32, but what is not quantized is written in the checkpoint's own dtype."""
    model, src = trained
    for f in ("model_config.json", "tokenizer.model"):
        shutil.copyfile(src / f, tmp_path / f)
    torch.save({k: v.bfloat16() for k, v in model.state_dict().items()}, tmp_path / "model.pth")
    (tmp_path / "calib.txt").write_text(" ".join(english_ish(100, seed=5)))
    quantize.main(["--checkpoint_path", str(tmp_path / "model.pth"), "--mode", "int4-gptq", "--groupsize", "32",
            "--calibration_file", str(tmp_path / "calib.txt"), "--calibration_limit", "4", "--no-quantize_output"])
    saved = torch.load(tmp_path / "model_int4-gptq.g32.pth", weights_only=True)
    state = saved["state_dict"]
    assert state["tok_embeddings.weight"].dtype == state["output.weight"].dtype == torch.bfloat16
    assert state["layers.0.attention_norm.weight"].dtype == torch.bfloat16
    assert state["layers.0.attention.wqkv.weight"].dtype == torch.uint8
    assert state["layers.0.attention.wqkv.scales_and_zeros"].dtype == torch.float32
    assert "output" not in saved["quantization"]["layers"]
    assert saved["quantization"]["gptq"]["calibration_seq_length"] == 256  # 2048 capped at the model's context


def test_cli_user_mistakes_are_one_error_line(cli, tmp_path):
    d, calib, _, _ = cli
    ckpt = ("--checkpoint_path", d / "model.pth")
    mistakes = {
        "unknown --mode 'int3'": (*ckpt, "--mode", "int3"),
        "--groupsize must be one of 32, 64, 128, 256": (*ckpt, "--mode", "int4", "--groupsize", "48"),
        "is already quantized": ("--checkpoint_path", d / "model_int8.pth", "--mode", "int4", "--groupsize", "64"),
        "calibration file not found": (*ckpt, "--mode", "int4-gptq", "--calibration_file", tmp_path / "nope.txt"),
        "needs calibration text: pass --calibration_file": (*ckpt, "--mode", "int4-gptq"),
        "use --calibration_file": (*ckpt, "--mode", "int4-gptq", "--calibration_tasks", "wikitext"),
        "checkpoint not found": ("--checkpoint_path", tmp_path / "missing" / "model.pth", "--mode", "int8"),
        "--calibration_file is for --mode int4-gptq": (*ckpt, "--mode", "int4", "--calibration_file", calib),
    }
    files = sorted(f.name for f in d.iterdir())
    procs = run_all(*[("quantize.py", *args) for args in mistakes.values()])
    for proc, expected in zip(procs, mistakes):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expected in lines[0] and proc.stdout == ""
    assert sorted(f.name for f in d.iterdir()) == files  # nothing written


def test_int8_compiled_in_bfloat16_with_unaligned_rows(hf_checkpoint, load_cpu, prompt_ids, tmp_path):
    """w2's 172 input features are padded to 192 at load so ATen's int8 CPU kernel (16-byte aligned row loads) is
    safe also where inductor rewrites a dequantise-then-matmul into that kernel: compiled multi-token scoring and
    the compiled decode step give the eager bfloat16 results."""
    _, d = hf_checkpoint("gqa")
    state, meta = Q.quantize_model(load_cpu(d), "int8", 0, progress=False)
    path = save_quantized(tmp_path, state, meta, ModelArgs.load(d / CONFIG_NAME))
    model = checkpoint.load_model(path, "cpu", torch.bfloat16)
    w2 = model.layers[0].feed_forward.w2
    assert (w2.in_features, w2.weight.shape[1]) == (172, 192)
    idx = torch.tensor([prompt_ids(12)])
    with torch.inference_mode():
        eager = model(idx)
        compiled = torch.compile(model, dynamic=True)(idx)
    torch.testing.assert_close(compiled, eager, atol=0.05, rtol=0.05)  # bf16 rounding in a different order
    greedy = SamplingConfig(temperature=0)
    rows = [decoding.generate(model, [idx[0].tolist()], 8, greedy, steps=steps).tokens[0]
            for steps in (decoding.Steps(), decoding.make_steps("cpu", compile=True))]
    assert rows[0] == rows[1]
