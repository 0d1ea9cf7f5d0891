"""--interactive chat: each turn continues in the KV cache, which must give exactly what a fresh greedy prefill of
the whole conversation (built with the tokenizer's chat template) gives; a full cache starts a new conversation."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fresh_chat_replies

import decoding
from llama_fast.chat.templates import Llama2Template, chat_template
from sampling import SamplingConfig
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 8
GREEDY = SamplingConfig(temperature=0)


def chat(checkpoint: Path, lines: list, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "generate.py", "--interactive", "--checkpoint_path", str(checkpoint), "--temperature", "0",
           "--precision", "float32", "--device", "cpu", "--max_new_tokens", str(N_NEW), *extra]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, input="\n".join(lines).encode() + b"\n", capture_output=True,
                          timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def replies(stdout: str) -> list:
    return re.findall(r"Assistant: (.*?)\n\nUser: ", stdout, re.S)


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint, load_cpu):
    _, d = hf_checkpoint("gqa")
    return d, load_tokenizer(d / "tokenizer.model"), load_cpu(d)  # the chat runs with --device cpu


def test_turns_continue_in_the_cache_exactly(ckpt):
    """The checkpoint's own template (tokenizer_config.json's Llama-2 one, rendered through SentencePiece)."""
    d, tok, model = ckpt
    users = ["Hello there, how are you", "Tell me about the river", "And the king?"]
    proc = chat(d / "model.pth", users, "--system", "Be brief.")
    assert replies(proc.stdout) == fresh_chat_replies(model, tok, chat_template(tok), users, N_NEW, "Be brief.")


def test_a_built_in_template_by_name(ckpt):
    d, tok, model = ckpt
    users = ["Hello there, how are you", "And the king?"]
    proc = chat(d / "model.pth", users, "--chat_template", "llama2")
    assert "chat template: llama2" in proc.stdout
    assert replies(proc.stdout) == fresh_chat_replies(model, tok, Llama2Template(tok), users, N_NEW)


def test_full_context_starts_a_new_conversation(ckpt):
    d, tok, model = ckpt
    users = ["Hello there, how are you", "Tell me about the river and the old farmer"]
    template = chat_template(tok)
    first = template.encode([{"role": "user", "content": users[0]}])
    max_seq = len(first) + N_NEW + 4  # room for the first exchange only
    proc = chat(d / "model.pth", users, "--max_seq_length", str(max_seq))
    assert "[context full" in proc.stdout
    # After the reset the second message is answered as the first turn of a new conversation.
    second = template.encode([{"role": "user", "content": users[1]}])
    stop = [*tok.eos_ids, template.end_of_turn]
    fresh = decoding.generate(model, [second], min(N_NEW, max_seq - len(second)), GREEDY, stop).tokens[0]
    assert replies(proc.stdout)[1] == tok.decode([t for t in fresh if t not in stop])


def test_no_template_is_refused_before_loading(ckpt, tmp_path):
    d, _, _ = ckpt
    for name in ("model.pth", "model_config.json", "tokenizer.model"):
        (tmp_path / name).symlink_to(d / name)
    cmd = [sys.executable, "generate.py", "--interactive", "--checkpoint_path", str(tmp_path / "model.pth")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, input="hi\n", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no chat template" in proc.stderr and "--chat_template" in proc.stderr
