"""Shared fixtures: a SentencePiece tokenizer trained on the fly and tiny random-init Hugging Face Llama
checkpoints converted with scripts/convert_hf_checkpoint.py. Nothing is downloaded."""
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent  # on sys.path with scripts/ (pytest.ini's pythonpath)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# cpu_kernels caches its measured choice per machine under $XDG_CACHE_HOME: the tests (and the commands they run)
# measure into a cache of their own instead of the user's, removed when the session ends (~50 MB a run)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="llama-fast-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
# and inductor compiles into a cache of its own: graphs compiled by another version of this code are never reused
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["XDG_CACHE_HOME"], "inductor")

# The models here are tiny: with several intra-op threads every small op pays OpenMP start-up and, on a busy
# 2-core machine, spin-wait contention (HF generate() of 32 tokens measured 1.4 s with 2 threads, 0.05 s with 1).
torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------ --device
# pytest --device cuda runs the tests that use the `device` fixture (directly or through load_ours) with our model on
# that device; the reference models (transformers, float64 formulas) stay on CPU and our outputs are moved there to
# be compared. Everything else runs on CPU whatever --device says. The default, cpu, runs everything on CPU.
DEVICE_KINDS = ("cpu", "cuda")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="where the device-aware tests (marker `device`) run our model: "
                     "cpu (default), cuda or cuda:N; the reference models and the CPU-only tests stay on CPU")


def check_device(device: str) -> str:
    """The --device value, normalised ("cpu", "cuda", "cuda:N"); a UsageError (one line, exit status 4) when it is
    not a device kind the tests know or not present on this machine."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in DEVICE_KINDS:
        raise pytest.UsageError(f"--device {device}: not a device these tests run on; use cpu, cuda or cuda:N")
    if d.type == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: no CUDA device is present (torch.cuda.is_available() is False)")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise pytest.UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are present")
    return str(d)


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs our model on --device (added to every test that uses the "
                            "`device` fixture, directly or through another fixture such as load_ours)")
    config.option.device = check_device(config.getoption("--device"))  # stops here, before any collection
    if config.option.device != "cpu":
        # float32 matmuls in float32, not TF32 (torch's default, made explicit): the tolerances assume it
        torch.set_float32_matmul_precision("highest")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """The --device of the run: "cpu" (default), "cuda" or "cuda:N"."""
    return pytestconfig.getoption("--device")


def on_cpu(device: str) -> bool:
    return torch.device(device).type == "cpu"


VOCAB_SIZE = 400

# Tiny model shared by all parity tests; every entry of HF_CONFIGS overrides some of it.
BASE_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=172,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    # 5x Llama's 0.02: random-init logits are then spread out (std ~0.8) instead of nearly uniform, so greedy
    # continuations are decided by clear margins, not by rounding between near-ties. Not larger: float32 rounding
    # grows with activations (measured against a float64 run: ~2.5e-6 on the logits at 0.1, ~1.2e-5 at 0.2),
    # and it must stay well below the 1e-5 KV-cache tolerance.
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# name -> (config overrides, max_shard_size for save_pretrained or None)
HF_CONFIGS = {
    "mha": ({}, None),
    "gqa": ({"num_key_value_heads": 2}, None),
    # original_max_position_embeddings=32 puts the llama3 wavelength cut-offs (32/4=8 .. 32/1=32 positions)
    # inside the 16-dim head's frequency range, so low, medium and high frequency bands all occur.
    "llama3_rope": ({"rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}, None),
    "tied": ({"tie_word_embeddings": True}, None),
    "sharded": ({}, "150KB"),
    # Mistral: attention limited to the last 24 positions, well inside the 64-token prompts of the parity tests
    "mistral_window": ({"model_type": "mistral", "sliding_window": 24, "num_key_value_heads": 2}, None),
    # Qwen2: biases on Q, K and V, tied embeddings; Qwen3: per-head Q/K norms, head_dim 32 (not 64 / 4 heads)
    "qwen2": ({"model_type": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 1e6}, None),
    "qwen3": ({"model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 32}, None),
    # mixtures of experts: Mixtral (8 experts, top-2, sharded safetensors), Qwen3-MoE (Q/K norms, 6 experts of its
    # own width, top-2, weights not renormalized)
    "mixtral": ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "num_key_value_heads": 2},
                "300KB"),
    "qwen3_moe": ({"model_type": "qwen3_moe", "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                   "norm_topk_prob": False, "num_key_value_heads": 2}, None),
}
CONFIG_SEEDS = {name: i for i, name in enumerate(HF_CONFIGS)}

WORDS = ("the a an one small big red blue green old new quick slow happy sad dog cat bird fish tree house river "
         "mountain city road car boat king queen child teacher farmer doctor runs jumps sings walks reads writes "
         "sees finds makes takes gives likes loves hates eats drinks sleeps and or but because when while after "
         "before over under near with without from into across today yesterday tomorrow always never often "
         "sometimes very quite rather far close bright dark warm cold loud quiet").split()


def english_ish(n_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        words[0] = words[0].capitalize()
        tail = rng.choice([".", ".", "!", "?", ",", "; 42.", " (3 times)."])
        lines.append(" ".join(words) + tail)
    return lines


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A Llama-2-like SentencePiece BPE model: byte fallback, unk 0, bos 1, eos 2, no pad."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    corpus = english_ish(400, seed=1234)  # ~25 KB
    assert sum(map(len, corpus)) > 4000
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=f, vocab_size=VOCAB_SIZE, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return path


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_path):
    from tokenizer import load_tokenizer

    tok = load_tokenizer(sp_model_path)
    assert tok.vocab_size == VOCAB_SIZE and tok.bos_id == 1 and tok.eos_ids == [2]
    return tok


def make_prompt(tok, n_tokens: int, seed: int) -> list[int]:
    """Exactly n_tokens ids: bos followed by the start of some generated text."""
    text = " ".join(english_ish(max(4, n_tokens // 3), seed=seed))
    ids = tok.encode(text)
    assert len(ids) >= n_tokens
    return ids[:n_tokens]


@pytest.fixture(scope="session")
def prompt_ids(sp_tokenizer):
    return lambda n_tokens, seed=0: make_prompt(sp_tokenizer, n_tokens, seed)


def _build_hf_checkpoint(root: Path, sp_model_path: Path, name: str, overrides: dict, max_shard_size=None, seed=0):
    import transformers

    import convert_hf_checkpoint

    overrides = dict(overrides)
    family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
              "qwen3_moe": "Qwen3Moe"}[overrides.pop("model_type", "llama")]
    cfg = getattr(transformers, f"{family}Config")(**{**BASE_CONFIG, "vocab_size": VOCAB_SIZE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).float().eval()
    with torch.no_grad():  # RMSNorm weights start at 1; randomise them so that a mixed-up norm would show
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.uniform_(0.5, 1.5)
        for key, param in model.named_parameters():  # biases (Qwen2's Q/K/V) start at 0: randomise them too
            if key.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    d = root / name
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(d, **kwargs)
    shutil.copyfile(sp_model_path, d / "tokenizer.model")
    # as Llama-2-7b-chat-hf has it: the template chat renders (tests compare it with Meta's own Llama-2 format)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": LLAMA2_TEMPLATE}))
    out = convert_hf_checkpoint.convert(d)
    assert out == d / "model.pth" and out.is_file() and (d / "model_config.json").is_file()
    model.config._attn_implementation = "eager"  # reference attention: explicit softmax(QK^T)V, not SDPA
    return model, d


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, sp_model_path):
    """Factory: hf_checkpoint(name, **config_overrides) -> (HF LlamaForCausalLM, or the model_type's
    own class: mistral, qwen2, qwen3; checkpoint dir holding
    config.json + HF weights + model.pth + model_config.json + tokenizer.model). Cached per arguments."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def factory(name: str, max_shard_size=None, **overrides):
        key = (name, max_shard_size, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            if name in HF_CONFIGS and not overrides and max_shard_size is None:
                overrides, max_shard_size = HF_CONFIGS[name]
            # different weights for every model, and the same whatever ran before (not the count of models made)
            seed = CONFIG_SEEDS.get(name, 100 + zlib.crc32(repr(key).encode()) % 10_000)
            cache[key] = _build_hf_checkpoint(root, sp_model_path, f"{name}_{len(cache)}", overrides, max_shard_size,
                                              seed)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def quantized_copy(hf_checkpoint, tmp_path_factory):
    """Factory: quantized_copy(name, *quantize_args) -> a copy of hf_checkpoint(name)'s directory (model.pth,
    model_config.json, tokenizer.model) in which quantize.py has written its quantized checkpoint; returns the
    copy's folder. Cached per arguments."""
    cache = {}

    def factory(name: str, *args):
        if (name, args) not in cache:
            _, d = hf_checkpoint(name)
            root = tmp_path_factory.mktemp("quantized")
            for f in ("model.pth", "model_config.json", "tokenizer.model"):
                shutil.copyfile(d / f, root / f)
            proc = subprocess.run([sys.executable, "quantize.py", "--checkpoint_path", root / "model.pth", *args],
                                  cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            cache[name, args] = root
        return cache[name, args]

    return factory


@pytest.fixture(scope="session")
def load_ours(device):
    """load_ours(checkpoint_dir) -> a fresh float32 Transformer on the run's --device, loaded through
    checkpoint.load_model. Tests that use it run their model on the device (they are marked `device`)."""
    from llama_fast import checkpoint

    return lambda d: checkpoint.load_model(Path(d) / "model.pth", device, torch.float32)


@pytest.fixture(scope="session")
def load_cpu():
    """load_cpu(checkpoint_dir) -> a fresh float32 CPU Transformer, for the tests that only make sense on CPU
    (command-line subprocesses run with --device cpu, tensor parallelism over gloo, CPU kernels)."""
    from llama_fast import checkpoint

    return lambda d: checkpoint.load_model(Path(d) / "model.pth", "cpu", torch.float32)


def hf_greedy(hf_model, prompts: list, max_new_tokens: int) -> list:
    """Reference greedy continuations from transformers' generate(), one prompt at a time, never stopping at
    EOS (our generate() is called with eos_ids=() in the comparisons)."""
    saved = hf_model.generation_config.eos_token_id
    hf_model.generation_config.eos_token_id = None  # a None passed to generate() would fall back to this one
    try:
        out = []
        for p in prompts:
            with torch.no_grad():
                seq = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
            new = seq[0, len(p):].tolist()
            assert len(new) == max_new_tokens
            out.append(new)
        return out
    finally:
        hf_model.generation_config.eos_token_id = saved


# ------------------------------------------------------------------------------------------ tokenizer.json

# Llama-2-7b-chat-hf's chat template, as its tokenizer_config.json has it
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# Meta-Llama-3-8B-Instruct's chat template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# Qwen2.5's chat template, abridged (no tools): a default system prompt when none is given
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) or "
    "message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

# Qwen2.5-Instruct's chat template, its tools section and tool messages included, written out after the one its
# tokenizer_config.json has (the default system prompt shortened); the tests hold it to transformers' rendering
QWEN_TOOLS_TEMPLATE = (Path(__file__).parent / "templates" / "qwen2.5-instruct.jinja").read_text()


def train_byte_level_bpe(vocab_size: int, specials: list, bos_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = english_ish(400, seed=3) + ["naïve café 東京タワー 🎉 — déjà vu"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    if bos_template:  # Llama-3's tokenizer.json: the post-processor puts BOS first
        tok.post_processor = processors.TemplateProcessing(single=f"{bos_template} $A", pair=f"{bos_template} $A $B",
                                                           special_tokens=[(bos_template,
                                                                            tok.token_to_id(bos_template))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(d: Path, tok, config: dict, generation_config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if generation_config:
        (d / "generation_config.json").write_text(json.dumps(generation_config))
    return d / "tokenizer.json"


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with a Qwen-like tokenizer: a 380-token byte-level BPE tokenizer.json (it fits the 400-row test
    models), tokenizer_config.json with the ChatML template and <|im_end|> as EOS, generation_config.json listing
    both end tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_byte_level_bpe(380, specials)
    d = tmp_path_factory.mktemp("chatml_tokenizer")
    ids = {t: tok.token_to_id(t) for t in specials}
    write_tokenizer(d, tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                             "chat_template": CHATML}, {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
    return d


@pytest.fixture(scope="session")
def qwen_tools_checkpoint(hf_checkpoint, chatml_tokenizer_dir, tmp_path_factory) -> Path:
    """A Qwen2 test model with the ChatML test tokenizer and Qwen2.5's template, tools and all (a 2048-token
    context: the tools take 770 of the test tokenizer's tokens)."""
    _, src = hf_checkpoint("qwen2_tools", model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True,
                           rope_theta=1e6, max_position_embeddings=2048)
    d = tmp_path_factory.mktemp("qwen_tools")
    for name in ("model.pth", "model_config.json"):
        (d / name).write_bytes((src / name).read_bytes())
    for name in ("tokenizer.json", "generation_config.json"):
        (d / name).write_bytes((chatml_tokenizer_dir / name).read_bytes())
    config = json.loads((chatml_tokenizer_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN_TOOLS_TEMPLATE}))
    return d
