"""tokenizer.json (any Hugging Face fast tokenizer): a byte-level BPE trained here with the `tokenizers` library,
with a ChatML chat template (Qwen's) or a Llama-3-style one with a BOS post-processor, must encode, decode and
render chats exactly as transformers' AutoTokenizer and apply_chat_template do on the same files; and a Qwen2
checkpoint whose only tokenizer is a tokenizer.json runs from the command line, chat included."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import english_ish, train_byte_level_bpe, write_tokenizer
from helpers import fresh_chat_replies

import decoding
from sampling import SamplingConfig
from decoding import StreamDecoder
from llama_fast.chat.templates import chat_template
from tokenizer import HFTokenizer, TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# Llama-3's template, abridged: BOS written by the template, content trimmed, raise_exception on a bad role
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnew lines  ", "naïve café, 東京タワー 🎉🎉 — ok?",
         "The quick dog sees a red bird; 42 times!", "<|im_end|> typed by a user", ""]


@pytest.fixture(scope="module")
def qwen_files(chatml_tokenizer_dir):
    """(folder, our tokenizer, AutoTokenizer) for the 380-token ChatML tokenizer.json of conftest."""
    from transformers import AutoTokenizer

    d = chatml_tokenizer_dir
    return d, load_tokenizer(d / "tokenizer.json"), AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def llama3_files(tmp_path_factory):
    from transformers import AutoTokenizer

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = train_byte_level_bpe(390, specials, bos_template="<|begin_of_text|>")
    d = tmp_path_factory.mktemp("llama3_tok")
    eot = {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}  # as transformers serializes an AddedToken
    path = write_tokenizer(d, tok, {"bos_token": "<|begin_of_text|>", "eos_token": eot,
                                    "chat_template": [{"name": "default", "template": LLAMA3}]})
    return d, load_tokenizer(path), AutoTokenizer.from_pretrained(d)


@pytest.fixture(params=["qwen", "llama3"])
def files(request, qwen_files, llama3_files):
    return qwen_files if request.param == "qwen" else llama3_files


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Où est le chat? 🐱"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me about the river."}],
]


def test_loaded_by_content_with_special_tokens_from_the_files(qwen_files, llama3_files):
    _, qwen, _ = qwen_files
    assert isinstance(qwen, HFTokenizer) and qwen.vocab_size == 380 and qwen.bos_id is None
    assert qwen.eos_ids == [qwen._tok.token_to_id("<|im_end|>"), qwen._tok.token_to_id("<|endoftext|>")]
    assert chat_template(qwen).end_of_turn == qwen._tok.token_to_id("<|im_end|>")
    _, llama3, _ = llama3_files
    assert llama3.bos_id == llama3._tok.token_to_id("<|begin_of_text|>")
    assert llama3.eos_ids == [chat_template(llama3).end_of_turn] == [llama3._tok.token_to_id("<|eot_id|>")]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_as_autotokenizer(files, text):
    _, ours, auto = files
    ids = ours.encode(text)
    assert ids == auto(text)["input_ids"]  # BOS from the post-processor where it has one (Llama-3), none for Qwen
    assert ours.encode(text, bos=False) == auto(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True)
    if "<|" not in text:
        assert ours.decode(ours.encode(text, bos=False)) == text
        assert b"".join(ours.token_bytes(i) for i in ours.encode(text, bos=False)) == text.encode()


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_as_apply_chat_template(files, messages, add_generation_prompt):
    _, ours, auto = files
    expected = auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    template = chat_template(ours)
    assert template.render(messages, add_generation_prompt) == expected
    ids = auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert template.encode(messages, add_generation_prompt) == list(ids)


def test_stream_decoder_on_byte_level_tokens(files):
    """Byte-level tokens split characters (東, 🎉 are several tokens each): nothing partial is ever emitted."""
    _, ours, _ = files
    ids = ours.encode("naïve café 東京タワー 🎉🎉 — ok? The quick dog.", bos=False)
    stream, pieces = StreamDecoder(ours), []
    for t in ids:
        pieces.append(stream.push([t]))
    assert "".join(pieces) + stream.flush() == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("content, says", [
    (b"{not json", "not a valid tokenizer.json"),
    (b'{"version": "1.0"}', "not a valid tokenizer.json"),
])
def test_unreadable_tokenizer_json(tmp_path, content, says):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=says):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_template_errors_are_one_line(qwen_files, tmp_path):
    d, _, _ = qwen_files
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                "chat_template": "{% for m in messages %}"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="chat template does not parse"):
        chat_template(tok)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert chat_template(load_tokenizer(tmp_path / "tokenizer.json")) is None  # chat is refused: no format guessed


# ------------------------------------------------------------------------------------------ through the CLI

@pytest.fixture(scope="module")
def qwen_checkpoint(hf_checkpoint, qwen_files, load_cpu, tmp_path_factory):
    """The Qwen2 test model with the tokenizer.json (and its configs) as its only tokenizer."""
    _, src = hf_checkpoint("qwen2")
    d = tmp_path_factory.mktemp("qwen_ckpt")
    for name in ("model.pth", "model_config.json"):
        (d / name).write_bytes((src / name).read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (d / name).write_bytes((qwen_files[0] / name).read_bytes())
    return d, load_tokenizer(d / "tokenizer.json"), load_cpu(d)


def run_generate(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "generate.py", *map(str, args), "--temperature", "0", "--precision",
                           "float32", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, timeout=300,
                          input=stdin.encode() if stdin else None)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_cli_generates_with_tokenizer_json(qwen_checkpoint):
    d, tok, model = qwen_checkpoint
    prompt = "The quick dog sees a red bird and"
    row = decoding.generate(model, [tok.encode(prompt)], 16, SamplingConfig(temperature=0), tok.eos_ids).tokens[0]
    proc = run_generate("--checkpoint_path", d / "model.pth", "--prompt", prompt, "--max_new_tokens", 16,
                        "--num_samples", 1)
    assert proc.stdout == prompt + tok.decode([t for t in row if t not in tok.eos_ids]) + "\n"


def test_cli_chat_with_the_checkpoints_own_template(qwen_checkpoint):
    """--interactive renders turns with the ChatML template of tokenizer_config.json; each reply is what a fresh
    greedy prefill of the whole conversation so far gives."""
    d, tok, model = qwen_checkpoint
    users = ["Hello there, how are you", "Tell me about the river"]
    proc = run_generate("--checkpoint_path", d / "model.pth", "--interactive", "--max_new_tokens", 8,
                        stdin="\n".join(users) + "\n")
    expected = fresh_chat_replies(model, tok, chat_template(tok), users, 8)
    assert re.findall(r"Assistant: (.*?)\n\nUser: ", proc.stdout, re.S) == expected


def test_gptq_calibration_windows_without_bos(qwen_files):
    """A tokenizer with no BOS (Qwen) calibrates on plain windows of the text's tokens, seq_length each."""
    from llama_fast.quant.gptq import calibration_sequences

    _, tok, _ = qwen_files
    text = " ".join(english_ish(40, seed=4))
    ids = tok.encode(text, bos=False)
    windows = calibration_sequences(tok, text, limit=3, seq_length=16)
    assert windows == [ids[0:16], ids[16:32], ids[32:48]]
