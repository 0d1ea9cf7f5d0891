"""step_kernels: with compiled steps, auto times the compiled decode step each way (auto's eager kernels, inductor's
generated loops) on a stand-in of the model and uses the faster; the stand-in has the model's layer shapes, weight
formats and dtypes; the choice is cached per machine and used as cached; generate.py --compile takes it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpu_kernels
import step_kernels
from checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent


def layout(model) -> dict:
    """Each tensor of the state dict: shape and dtype (the quantized layers' as packed for the CPU)."""
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_stand_in_has_the_models_layers_and_formats(quantized_copy, hf_checkpoint, monkeypatch, mode):
    if mode == "bf16":
        path = hf_checkpoint("gqa")[1] / "model.pth"
    else:
        args = ["--mode", mode] + (["--groupsize", "32"] if mode == "int4" else [])
        path = quantized_copy("gqa", *args) / f"model_{mode}{'.g32' if mode == 'int4' else ''}.pth"
    model = load_model(path, "cpu", torch.bfloat16, cpu_kernels="addmv")  # as loaded, before kernels are given
    whole = step_kernels.stand_in(model)  # a small model: all its layers
    assert whole.config == model.config and layout(whole) == layout(model)
    assert not torch.equal(whole.layers[0].attention.wqkv.weight, model.layers[0].attention.wqkv.weight)
    monkeypatch.setattr(step_kernels, "STAND_IN_BYTES", 1)  # one layer makes it: only layer 0 is kept
    one = step_kernels.stand_in(model)
    assert one.config.n_layers == 1 and model.config.n_layers > 1
    assert layout(one) == {k: v for k, v in layout(model).items() if not k.startswith("layers.")
                           or k.startswith("layers.0.")}


def test_auto_times_the_compiled_step_and_caches_its_choice(hf_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = hf_checkpoint("gqa")[1] / "model.pth"
    model = load_model(path, "cpu", torch.bfloat16, compiled=True)
    table = json.loads(cpu_kernels.cache_path().read_text())
    [key] = [k for k in table if "compiled one-token step" in k]
    assert key.startswith(cpu_kernels.machine_key())
    rates, chosen = table[key]["rates"], table[key]["kernel"]
    assert set(rates) == {"auto", "inductor"} and all(r > 0 for r in rates.values())
    assert chosen == max(rates, key=rates.get) and (model.cpu_kernel == "inductor") == (chosen == "inductor")

    # the cached choice is used as it is: nothing is measured again
    table[key]["kernel"] = other = "auto" if chosen == "inductor" else "inductor"
    cpu_kernels.cache_path().write_text(json.dumps(table))
    monkeypatch.setattr(step_kernels, "step_rates", lambda m: pytest.fail("measured although cached"))
    assert (load_model(path, "cpu", torch.bfloat16, compiled=True).cpu_kernel == "inductor") == (other == "inductor")
    # a choice timed with older loops is timed again
    old_key = key.replace(f"loops v{step_kernels.LOOP_VERSION}", "loops v1")
    cpu_kernels.cache_path().write_text(json.dumps({old_key: table.pop(key)}))
    monkeypatch.setattr(step_kernels, "step_rates", lambda m: {"auto": 1.0, "inductor": 2.0})
    assert load_model(path, "cpu", torch.bfloat16, compiled=True).cpu_kernel == "inductor"
    assert {old_key, key} <= set(json.loads(cpu_kernels.cache_path().read_text()))
    # eager steps, a forced kernel, float32 weights (no generated loop for them): no step is timed
    assert load_model(path, "cpu", torch.bfloat16).cpu_kernel != "inductor"
    assert load_model(path, "cpu", torch.bfloat16, cpu_kernels="addmv", compiled=True).cpu_kernel == "addmv"
    assert load_model(path, "cpu", torch.float32, compiled=True).cpu_kernel == "addmv"


def test_another_build_of_the_loops_is_timed_again(hf_checkpoint, tmp_path, monkeypatch, capsys):
    """The generated loops' speed depends on who builds and runs them (on an AVX2 Zen 3, clang's int8 loop streamed
    13x GCC's): a choice timed with g++ is not reused with clang, nor without LLVM's OpenMP runtime preloaded with
    it; clang without it gets a one-line warning (two OpenMP runtimes competing for the cores)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    path = hf_checkpoint("gqa")[1] / "model.pth"
    timed = []
    monkeypatch.setattr(step_kernels, "step_rates",
                        lambda m: timed.append(step_kernels.inductor_build()) or {"auto": 2.0, "inductor": 1.0})
    step_kernels.say_once.cache_clear()
    for cxx, preload in [("g++", None), ("g++", None), ("clang++", None), ("clang++", "/x/libomp.so.5")]:
        if preload:
            monkeypatch.setenv("LD_PRELOAD", preload)
        # inductor's own patch, not monkeypatch: pytest 9.2's undo deletes the config entry (hidden for good)
        with torch._inductor.config.patch({"cpp.cxx": (None, cxx)}):
            assert load_model(path, "cpu", torch.bfloat16, compiled=True).cpu_kernel != "inductor"
        assert ("LD_PRELOAD=" in capsys.readouterr().err) == (cxx == "clang++" and not preload)
    assert timed == ["g++, GNU OpenMP", "clang++, GNU OpenMP", "clang++, LLVM OpenMP preloaded"]


def test_stand_ins_leave_the_recompile_limit_alone(hf_checkpoint, prompt_ids):
    """dynamo stops compiling a function after 8 graphs (and fullgraph then fails): 5 timings (10 stand-in graphs)
    in one process, then the model's own compiled decode still compiles and gives its eager tokens."""
    from decoding import generate, make_steps
    from sampling import SamplingConfig
    model = load_model(hf_checkpoint("gqa")[1] / "model.pth", "cpu", torch.bfloat16, cpu_kernels="addmv")
    for _ in range(5):
        assert set(step_kernels.step_rates(model)) == {"auto", "inductor"}
    prompt, greedy = prompt_ids(7, seed=2), SamplingConfig(temperature=0)
    expected = generate(model, [prompt], 8, greedy).tokens
    assert generate(model, [prompt], 8, greedy, steps=make_steps("cpu", compile=True)).tokens == expected


def test_generate_compile_takes_the_measured_choice(quantized_copy, tmp_path):
    """generate.py --compile with the default auto, on an int8 checkpoint: the kernel it reports is the choice
    timed and cached for this model (in a cache of its own here)."""
    path = quantized_copy("gqa", "--mode", "int8") / "model_int8.pth"
    metrics, cache = tmp_path / "m.json", tmp_path / "cache"
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(path),
                           "--device", "cpu", "--precision", "bfloat16", "--compile", "--prompt", "the",
                           "--max_new_tokens", "4", "--num_samples", "1", "--metrics_json", str(metrics)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((cache / "llama-fast" / "cpu_kernels.json").read_text())
    [entry] = [v for k, v in table.items() if "compiled one-token step" in k]
    reported = json.loads(metrics.read_text())["cpu_kernel"]
    assert (reported == "inductor") == (entry["kernel"] == "inductor"), (reported, entry)
