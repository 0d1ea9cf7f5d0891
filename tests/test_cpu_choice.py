"""llama_fast/cpu/choice.py: --cpu_kernels auto is a rule from the CPU's flags and the model's layer sizes (tested
here on the flags of the CPU kinds it was written from, whatever CPU runs the tests), a named kernel is forced where
the model can take it and refused with one line where it cannot, and use_cpu_kernels swaps the layers so that the
model computes what the float32 model does with each kernel, from Python and the CLI. References: the float32
model's logits, the weight-only int8 model's tokens, and the rule's table written out below."""
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from decoding import cpu_inductor, generate, make_steps
from llama_fast.checkpoint import load_model
from llama_fast.cpu import choice
from llama_fast.cpu import kernels as cpu_kernels
from llama_fast.cpu.choice import (CpuKernels, FLOAT32_FROM, LOOP_MAX_BYTES, choose_kernels, cpu_flags,
                                   default_kernels, has_16bit_gemm, metrics, use_cpu_kernels)
from llama_fast.cpu.layers import CpuKVCache, CpuLinear
from llama_fast.cpu.toolchain import inductor_build
from llama_fast.quant.qlinear import Int8Linear
from model import KVCache, Transformer
from model_config import ModelArgs
from sampling import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16


def cpuinfo(name: str, family: int, flags: str) -> str:
    """/proc/cpuinfo of a 2-processor machine (a block per processor: the first one counts)."""
    one = (f"processor\t: {{}}\nvendor_id\t: Whoever\ncpu family\t: {family}\nmodel\t\t: 1\nmodel name\t: {name}\n"
           f"flags\t\t: fpu sse2 {flags}\n")
    return "\n".join(one.format(i) for i in range(2))


# The CPU kinds the rule was written from (BENCHMARKS.md), by their flags
CPUS = {
    "zen3_avx2": cpuinfo("AMD EPYC", 25, "avx2 fma"),
    "epyc_avx512_bf16": cpuinfo("AMD EPYC", 26, "avx2 avx512f avx512_vnni avx512_bf16"),
    "xeon_amx": cpuinfo("Intel(R) Xeon(R) Platinum 8480+", 6, "avx2 avx512f avx512_bf16 amx_bf16 amx_int8"),
    "xeon_vnni_no_bf16": cpuinfo("Intel(R) Xeon(R) Platinum 8280", 6, "avx2 avx512f avx512_vnni"),
}
# The rule, written out per CPU kind, for 16-bit float linears: the eager kernel, the compiled one for layers of
# at most LOOP_MAX_BYTES on average ("small") and for larger ones, whether several-token GEMMs run in float32, and
# the int8 layers' kernel in compiled steps, and the small layers' several-token kernel beside the compiled loop
# (on a prepacked copy). ("onednn" reads "addmv" where this torch cannot pack the dtype, and None as the last.)
RULE = {  # cpu: (eager, compiled small, compiled large, float32 GEMMs, compiled int8, several beside the loop)
    "zen3_avx2": ("addmv", "inductor", "inductor", True, "int8pack", None),
    "epyc_avx512_bf16": ("onednn", "inductor", "onednn", False, "inductor", "onednn"),
    "xeon_amx": ("addmv", "inductor", "addmv", False, "inductor", None),
    "xeon_vnni_no_bf16": ("onednn", "inductor", "onednn", True, "inductor", "onednn"),
}


def loaded(path, precision=BF16, **kwargs):
    return load_model(path, "cpu", precision, **kwargs)


def large_model() -> Transformer:
    """One tinyllama-sized layer (linears of 8-46 MB in bf16) with uninitialised weights: only sizes matter."""
    config = ModelArgs(dim=2048, n_layers=1, n_heads=32, n_kv_heads=4, vocab_size=400, intermediate_size=5632)
    with torch.device("meta"):
        model = Transformer(config).to(BF16)
    return model.to_empty(device="cpu").eval()


def mean_linear_bytes(model) -> float:
    linears = choice.float_linears(model)
    return sum(m.weight.nbytes for m in linears) / len(linears)


def test_cpu_flags_are_the_first_processors():
    flags = cpu_flags(CPUS["epyc_avx512_bf16"])
    assert {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "fpu", "sse2"} == flags
    assert cpu_flags("processor\t: 0\nflags\t\t: avx2\n\nprocessor\t: 1\nflags\t\t: avx512f\n") == {"avx2"}
    assert cpu_flags("processor\t: 0\n") == frozenset()
    assert {cpu: has_16bit_gemm(cpu_flags(text)) for cpu, text in CPUS.items()} == {
        "zen3_avx2": False, "epyc_avx512_bf16": True, "xeon_amx": True, "xeon_vnni_no_bf16": False}


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "no_onednn"])
@pytest.mark.parametrize("cpu", list(CPUS))
def test_default_kernels_follow_the_cpu_flags(hf_checkpoint, quantized_copy, monkeypatch, cpu, onednn):
    """The rule for each CPU kind and model kind, from the flags alone: the machine running the test (and whether
    its oneDNN packs bf16) does not enter the expectation."""
    monkeypatch.setattr(choice, "candidates", lambda dtype: ["addmv", "onednn"] if onednn else ["addmv"])
    flags = cpu_flags(CPUS[cpu])
    eager, small, large, in_float32, int8, several = (k if k != "onednn" or onednn else "addmv" for k in RULE[cpu])
    several = several if onednn else None
    float32_from = FLOAT32_FROM if in_float32 else None
    path = hf_checkpoint("gqa")[1] / "model.pth"
    tiny, big = loaded(path, cpu_kernels="none"), large_model()
    assert mean_linear_bytes(tiny) <= LOOP_MAX_BYTES < mean_linear_bytes(big)
    for model, compiled_linear, beside in ((tiny, small, several), (big, large, None)):
        assert default_kernels(model, False, flags) == CpuKernels(eager, "int8pack", float32_from)
        assert default_kernels(model, True, flags) == CpuKernels(compiled_linear, "int8pack", float32_from, beside)
    # the threshold itself: layers of exactly LOOP_MAX_BYTES on average are small, a byte less makes them large
    monkeypatch.setattr(choice, "LOOP_MAX_BYTES", mean_linear_bytes(tiny))
    assert default_kernels(tiny, True, flags).linear == small
    monkeypatch.setattr(choice, "LOOP_MAX_BYTES", mean_linear_bytes(tiny) - 1)
    assert default_kernels(tiny, True, flags).linear == large
    # float32 weights: addmv, their own GEMM, whatever the CPU
    f32 = loaded(path, torch.float32, cpu_kernels="none")
    assert default_kernels(f32, False, flags) == default_kernels(f32, True, flags) == CpuKernels()
    # int8 layers (every linear, the output included): their kernel; the GEMMs of a bf16 model's activations
    int8_path = quantized_copy("gqa", "--mode", "int8") / "model_int8.pth"
    q = loaded(int8_path, cpu_kernels="none")
    assert not choice.float_linears(q) and choice.int8_layers(q)
    assert default_kernels(q, False, flags) == CpuKernels("addmv", "int8pack", float32_from)
    assert default_kernels(q, True, flags) == CpuKernels("addmv", int8, float32_from)
    q32 = loaded(int8_path, torch.float32, cpu_kernels="none")
    assert default_kernels(q32, True, flags) == CpuKernels("addmv", int8, None)


def test_auto_is_the_rule_for_this_cpu(hf_checkpoint):
    model = loaded(hf_checkpoint("gqa")[1] / "model.pth", cpu_kernels="none")
    for compiled in (False, True):
        assert choose_kernels(model, "auto", compiled=compiled) == default_kernels(model, compiled, cpu_flags())


def test_forced_kernels_and_their_errors(hf_checkpoint, quantized_copy, monkeypatch):
    path = hf_checkpoint("gqa")[1] / "model.pth"
    model = loaded(path, cpu_kernels="none")
    auto = default_kernels(model, False)
    for kernel in cpu_kernels.forcible(BF16):
        # the loop forced keeps auto's several-token kernel where that is oneDNN (on its prepacked copy)
        beside = "onednn" if kernel == "inductor" and auto.linear == "onednn" else None
        assert choose_kernels(model, kernel) == CpuKernels(kernel, "inductor" if kernel == "inductor" else "int8pack",
                                                           auto.float32_from, beside)
    # the several-token GEMMs: forced, or rank 0's answer passed on under tensor parallelism
    assert choose_kernels(model, "addmv", "native").float32_from is None
    assert choose_kernels(model, "addmv", "float32").float32_from == 2
    assert choose_kernels(model, "addmv", 16).float32_from == 16
    assert choose_kernels(model, "addmv", "auto").float32_from == auto.float32_from
    f32 = loaded(path, torch.float32, cpu_kernels="none")
    assert choose_kernels(f32, "addmv", "float32").float32_from is None  # float32 models: nothing to convert
    for kernel in ("onednn", "inductor"):
        with pytest.raises(ValueError) as e:
            choose_kernels(f32, kernel)
        assert str(e.value) == (f"--cpu_kernels {kernel}: not available for float32 weights here; choose from auto, "
                                "tune, addmv")
    with pytest.raises(ValueError, match="--cpu_kernels w8a8 is for int8 checkpoints"):
        choose_kernels(model, "w8a8")
    # int8 layers take inductor and (where a library is exact) w8a8; the float linears keep auto's kernel
    q = loaded(quantized_copy("gqa", "--mode", "int8") / "model_int8.pth", torch.float32, cpu_kernels="none")
    q_auto = default_kernels(q, False)
    assert choose_kernels(q, "inductor") == CpuKernels(q_auto.linear, "inductor", q_auto.float32_from)
    if cpu_kernels.w8a8_library():
        assert choose_kernels(q, "w8a8") == CpuKernels(q_auto.linear, "w8a8", q_auto.float32_from)
    monkeypatch.setattr(choice, "w8a8_library", lambda: None)
    with pytest.raises(ValueError, match="--cpu_kernels w8a8: not available for int8 layers on this CPU"):
        choose_kernels(q, "w8a8")
    # a kernel this torch cannot run for the dtype (oneDNN without bf16 packing)
    monkeypatch.setattr(choice, "forcible", lambda dtype: ["addmv", "inductor"])
    with pytest.raises(ValueError) as e:
        choose_kernels(model, "onednn")
    assert str(e.value) == ("--cpu_kernels onednn: not available for bfloat16 weights here; choose from auto, tune, "
                            "addmv, inductor")


def cpu_linears(model) -> list:
    return [m for m in model.modules() if isinstance(m, CpuLinear)]


def test_model_with_each_kernel_gives_the_same_logits(hf_checkpoint, prompt_ids):
    _, d = hf_checkpoint("tied")  # tied: the output projection shares the embedding and keeps addmv
    idx = torch.tensor([prompt_ids(24, seed=3)])
    reference = loaded(d / "model.pth", torch.float32)(idx)
    for kernel in cpu_kernels.forcible(BF16):
        torch._dynamo.reset()  # a fresh count of graphs per model: CpuLinear.forward is one code object
        model = loaded(d / "model.pth", cpu_kernels=kernel)
        assert model.cpu_kernels == choose_kernels(loaded(d / "model.pth", cpu_kernels="none"), kernel)
        assert model.kv_cache_class is CpuKVCache
        assert isinstance(model.output, CpuLinear) and model.output.kernel == "addmv"
        assert model.output.weight is model.tok_embeddings.weight
        assert not [m for m in model.modules() if type(m) is nn.Linear]
        assert {m.kernel for m in cpu_linears(model.layers)} == {kernel}
        logits = model(idx)
        # bf16 activations through 2 layers: a few percent of the logits' range
        assert (logits - reference).abs().max().item() <= 0.05 * reference.abs().max().item()
        # one token in a compiled graph: where inductor's kernel is the generated loop instead of F.linear
        one = torch.compile(model, fullgraph=True, backend=cpu_inductor())(idx[:, :1])
        assert (one - reference[:, :1]).abs().max().item() <= 0.05 * reference.abs().max().item()
    # "none": the layers as loaded, nothing swapped
    model = loaded(d / "model.pth", cpu_kernels="none")
    assert not cpu_linears(model) and model.kv_cache_class is KVCache and getattr(model, "cpu_kernels", None) is None


def test_float32_from_is_set_on_layers_as_the_choice_says(hf_checkpoint, quantized_copy, prompt_ids):
    """Every layer's float32_from is the choice's (auto's: from this CPU's flags), except oneDNN's, whose prepacked
    weight cannot be sliced; from Python, for float and int8 layers. Replaces a test that assumed the machine's
    own choice (and failed on a Xeon with AVX-512 VNNI and no AVX-512 BF16, where auto gives every layer oneDNN)."""
    _, d = hf_checkpoint("gqa")
    idx = torch.tensor([prompt_ids(24, seed=5)])
    reference = loaded(d / "model.pth", torch.float32)(idx)
    auto = default_kernels(loaded(d / "model.pth", cpu_kernels="none"), False).float32_from
    assert auto == (None if has_16bit_gemm() else FLOAT32_FROM)
    for kernels in ("auto", *cpu_kernels.candidates(BF16)):
        for gemm, expected in (("auto", auto), ("native", None), ("float32", 2)):
            model = loaded(d / "model.pth", cpu_kernels=kernels, cpu_gemm=gemm)
            assert model.cpu_kernels.float32_from == expected
            layers = cpu_linears(model)
            assert len(layers) == 1 + 4 * model.config.n_layers
            assert {m: m.float32_from for m in layers} == {m: None if m.kernel == "onednn" else expected
                                                           for m in layers}
            logits = model(idx)
            # bf16 activations through 2 layers: a few percent of the logits' range
            assert (logits - reference).abs().max().item() <= 0.05 * reference.abs().max().item()
    f32 = loaded(d / "model.pth", torch.float32, cpu_gemm="float32")
    assert f32.cpu_kernels.float32_from is None and {m.float32_from for m in cpu_linears(f32)} == {None}
    int8_path = quantized_copy("gqa", "--mode", "int8") / "model_int8.pth"
    for gemm, expected in (("native", None), ("float32", 2)):
        q = loaded(int8_path, cpu_gemm=gemm)
        assert {m.float32_from for m in choice.int8_layers(q)} == {expected}
    # the swap itself, whatever this CPU's auto: as the choice says
    for linear in cpu_kernels.candidates(BF16):
        model = use_cpu_kernels(loaded(d / "model.pth", cpu_kernels="none"), CpuKernels(linear, "int8pack", 16))
        assert {m.float32_from for m in cpu_linears(model)} == {None if linear == "onednn" else 16}
    q = use_cpu_kernels(loaded(int8_path, cpu_kernels="none"), CpuKernels("addmv", "int8pack", 16))
    assert {m.float32_from for m in choice.int8_layers(q)} == {16}


@pytest.mark.parametrize("cpu", list(CPUS))
def test_auto_model_on_each_cpu_kind(hf_checkpoint, prompt_ids, monkeypatch, cpu):
    """load_model's auto as it would be on each CPU kind (its flags in place of this one's): the layers' kernels and
    float32_from are the rule's (a Xeon with AVX-512 VNNI and no AVX-512 BF16: every layer oneDNN, which keeps its
    16-bit GEMM, though the choice says float32 from 16 tokens), and the logits the float32 model's."""
    monkeypatch.setattr(choice, "cpu_flags", lambda cpuinfo=None: cpu_flags(CPUS[cpu]))
    _, d = hf_checkpoint("gqa")
    idx = torch.tensor([prompt_ids(24, seed=5)])
    reference = loaded(d / "model.pth", torch.float32)(idx)
    eager, _, _, in_float32, _, _ = RULE[cpu]
    eager = eager if eager in cpu_kernels.candidates(BF16) else "addmv"
    float32_from = FLOAT32_FROM if in_float32 else None
    model = loaded(d / "model.pth")
    assert model.cpu_kernels == CpuKernels(eager, "int8pack", float32_from)
    assert {(m.kernel, m.float32_from) for m in cpu_linears(model)} == {
        (eager, None if eager == "onednn" else float32_from)}
    logits = model(idx)
    assert (logits - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


def test_off_cpu_nothing_is_swapped():
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=400))
    assert use_cpu_kernels(model, CpuKernels("inductor", "inductor", 2)) is model
    assert model.cpu_kernels is None and not cpu_linears(model) and model.kv_cache_class is KVCache
    assert metrics(model, True) == dict.fromkeys(("cpu_kernel", "cpu_kernel_several", "float32_from", "inductor_build"))


def test_metrics(hf_checkpoint, quantized_copy):
    path = hf_checkpoint("gqa")[1] / "model.pth"
    model = loaded(path, cpu_kernels="addmv", cpu_gemm="float32")
    assert metrics(model, False) == {"cpu_kernel": "addmv", "cpu_kernel_several": None, "float32_from": 2,
                                     "inductor_build": None}
    assert metrics(model, True) == {"cpu_kernel": "addmv", "cpu_kernel_several": None, "float32_from": 2,
                                    "inductor_build": inductor_build()}
    assert metrics(use_cpu_kernels(loaded(path, cpu_kernels="none"), CpuKernels("inductor", several="onednn")),
                   True)["cpu_kernel_several"] == "onednn"
    assert metrics(loaded(path, cpu_kernels="none"), False) == dict.fromkeys(
        ("cpu_kernel", "cpu_kernel_several", "float32_from", "inductor_build"))
    # int8 layers: their own kernel where it is not ATen's weight-only one, else the float linears'
    q = loaded(quantized_copy("gqa", "--mode", "int8") / "model_int8.pth", cpu_kernels="none")
    use_cpu_kernels(q, CpuKernels("addmv", "int8pack", None))
    assert metrics(q, False)["cpu_kernel"] == "addmv"
    use_cpu_kernels(q, CpuKernels("addmv", "inductor", None))
    assert metrics(q, False)["cpu_kernel"] == "inductor"


# ------------------------------------------------------------------ the CLI
def run_generate(path, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(path),
                           "--device", "cpu", "--prompt", "the", "--max_new_tokens", "4", "--num_samples", "1",
                           *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kernel", ["auto", *cpu_kernels.forcible(BF16)])
def test_cli_forces_each_kernel(hf_checkpoint, tmp_path, kernel):
    path = hf_checkpoint("gqa")[1] / "model.pth"
    metrics_json = tmp_path / "m.json"
    compiled = ["--compile"] if kernel == "inductor" else []  # its generated loop is in compiled steps only
    proc = run_generate(path, "--precision", "bfloat16", "--cpu_kernels", kernel, "--temperature", "0", *compiled,
                        "--metrics_json", str(metrics_json))
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = choose_kernels(loaded(path, cpu_kernels="none"), kernel, compiled=bool(compiled))
    reported = json.loads(metrics_json.read_text())
    assert (reported["cpu_kernel"], reported["float32_from"]) == (expected.linear, expected.float32_from)
    assert kernel == "auto" or expected.linear == kernel


@pytest.mark.parametrize("gemm", ["auto", "native", "float32"])
def test_cli_forces_the_gemm(hf_checkpoint, tmp_path, gemm):
    path = hf_checkpoint("gqa")[1] / "model.pth"
    metrics_json = tmp_path / "m.json"
    proc = run_generate(path, "--cpu_gemm", gemm, "--prompt", "the cat sat on the mat and", "--temperature", "0",
                        "--metrics_json", str(metrics_json))
    assert proc.returncode == 0, proc.stderr[-2000:]
    auto = default_kernels(loaded(path, cpu_kernels="none"), False).float32_from  # this CPU's flags decide
    assert json.loads(metrics_json.read_text())["float32_from"] == {"native": None, "float32": 2, "auto": auto}[gemm]


def test_cli_refuses_a_kernel_the_precision_has_not(hf_checkpoint):
    proc = run_generate(hf_checkpoint("gqa")[1] / "model.pth", "--precision", "float32", "--cpu_kernels", "onednn")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --cpu_kernels onednn: not available for float32 weights here; choose from auto, tune, addmv"]


def test_serve_compile_loads_the_compiled_steps_kernels(hf_checkpoint, monkeypatch):
    """serve.py --compile gives the model the kernels of compiled steps (the rule with compiled=True: on a small
    bf16 model on an AVX-512 EPYC, inductor's loop for one token and oneDNN for several), and without it the eager
    ones: the rule on each CPU kind, whatever runs the test."""
    import serve
    path = hf_checkpoint("gqa")[1] / "model.pth"
    as_loaded = loaded(path, cpu_kernels="none")
    for cpu in ("epyc_avx512_bf16", "zen3_avx2"):
        monkeypatch.setattr(choice, "cpu_flags", lambda cpuinfo=None: cpu_flags(CPUS[cpu]))
        kernels = {}
        for compiled in (True, False):
            args = serve.build_parser().parse_args(["--checkpoint_path", str(path), "--precision", "bfloat16",
                                                    *(["--compile"] if compiled else [])])
            kernels[compiled] = serve.load(args)[2].cpu_kernels
            assert kernels[compiled] == choose_kernels(as_loaded, compiled=compiled)
        assert kernels[True].linear == "inductor" != kernels[False].linear  # the flag decides


# ------------------------------------------------------------------ int8 models: inductor and w8a8
def test_int8_inductor_model_from_python_and_the_cli(quantized_copy, prompt_ids, tmp_path):
    """An int8 checkpoint loaded with cpu_kernels="inductor": every int8 layer takes it, and its compiled greedy
    decode gives the tokens of the weight-only model's eager one; from generate.py --cpu_kernels inductor."""
    path = quantized_copy("gqa", "--mode", "int8") / "model_int8.pth"
    model = loaded(path, torch.float32, cpu_kernels="inductor")
    int8 = choice.int8_layers(model)
    assert model.cpu_kernels.int8 == "inductor" and int8 and {m.kernel for m in int8} == {"inductor"}
    assert metrics(model, True)["cpu_kernel"] == "inductor"
    reference = loaded(path, torch.float32)
    prompt, greedy = prompt_ids(9, seed=7), SamplingConfig(temperature=0)
    expected = generate(reference, [prompt], 16, greedy).tokens
    assert generate(model, [prompt], 16, greedy, steps=make_steps("cpu", compile=True)).tokens == expected
    metrics_json = tmp_path / "m.json"
    proc = run_generate(path, "--precision", "bfloat16", "--compile", "--cpu_kernels", "inductor",
                        "--metrics_json", str(metrics_json), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(metrics_json.read_text())["cpu_kernel"] == "inductor"


@pytest.mark.skipif(not cpu_kernels.w8a8_library(), reason="neither oneDNN's u8s8 linear nor FBGEMM's is exact on "
                                                            "this CPU")
def test_w8a8_model_from_python_and_the_cli(hf_checkpoint, prompt_ids, tmp_path):
    """An int8 checkpoint loaded with cpu_kernels="w8a8": every int8 layer prepacked for its library, logits within
    the activations' rounding of the weight-only int8 model's, a batch decoding as each prompt alone, compiled as
    eager; from generate.py --cpu_kernels w8a8 with --compile."""
    from llama_fast.quant.qlinear import quantize_model
    _, d = hf_checkpoint("gqa")
    state, meta = quantize_model(loaded(d / "model.pth", torch.float32, cpu_kernels="none"), "int8", progress=False)
    path = tmp_path / "model_int8.pth"
    torch.save({"quantization": meta, "state_dict": state}, path)
    (tmp_path / "model_config.json").write_text((d / "model_config.json").read_text())
    weight_only = loaded(path, torch.float32)
    model = loaded(path, torch.float32, cpu_kernels="w8a8")
    assert model.cpu_kernels.int8 == "w8a8" and metrics(model, False)["cpu_kernel"] == "w8a8"
    int8 = choice.int8_layers(model)
    assert int8 and all(isinstance(m, Int8Linear) for m in int8)
    assert {(m.kernel, m.library) for m in int8} == {("w8a8", cpu_kernels.w8a8_library())}
    idx = torch.tensor([prompt_ids(24, seed=5)])
    with torch.inference_mode():
        ref, got = weight_only(idx), model(idx)
    levels = cpu_kernels.W8A8_LEVELS[cpu_kernels.w8a8_library()]  # the rounding error scales with 1 / levels
    assert (got - ref).norm() <= 0.05 * 127 / levels * ref.norm()
    prompts = [prompt_ids(n, seed=50 + n) for n in (7, 19, 12)]
    greedy = SamplingConfig(temperature=0)
    alone = [generate(model, [p], 12, greedy).tokens[0] for p in prompts]
    assert generate(model, prompts, 12, greedy).tokens == alone
    assert generate(model, prompts[:1], 12, greedy, steps=make_steps("cpu", compile=True)).tokens == alone[:1]
    metrics_json = tmp_path / "m.json"
    proc = run_generate(path, "--tokenizer_path", str(d / "tokenizer.model"), "--compile", "--cpu_kernels", "w8a8",
                        "--metrics_json", str(metrics_json), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(metrics_json.read_text())["cpu_kernel"] == "w8a8"


# ------------------------------------------------------------------ memory
def mapped(path: Path) -> bool:
    """Whether this process still has the file memory-mapped (torch.load(mmap=True) keeps it so while any tensor
    points into it, and every page that was read stays resident with it)."""
    gc.collect()
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_converted_weights_let_the_checkpoint_file_go(hf_checkpoint, quantized_copy, tmp_path):
    """Weights converted on load (prepacked for oneDNN, int4-packed) are copies: the file mapping they were read
    from must go, or the model is resident twice. Weights used as stored (addmv, inductor, none) are read from the
    mapping."""
    _, d = hf_checkpoint("tied")
    path = tmp_path / "model.pth"
    torch.save({k: v.bfloat16() for k, v in torch.load(d / "model.pth", weights_only=True).items()}, path)
    (tmp_path / "model_config.json").write_text((d / "model_config.json").read_text())
    for kernel in ("none", *cpu_kernels.forcible(BF16)):
        model = loaded(path, cpu_kernels=kernel)
        assert mapped(path) == (kernel in ("none", "addmv", "inductor")), kernel
        del model
        assert not mapped(path)
    path = quantized_copy("mha", "--mode", "int4", "--groupsize", "32") / "model_int4.g32.pth"
    model = loaded(path, torch.float32)
    assert model.quantization["mode"] == "int4" and not mapped(path)
