"""--interactive chat: each turn continues in the KV cache, which must give exactly what a fresh greedy prefill of
the whole conversation (built with the tokenizer's chat template) gives; a full cache starts a new conversation."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import decoding
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
    d, tok, model = ckpt
    users = ["Hello there, how are you", "Tell me about the river", "And the king?"]
    proc = chat(d / "model.pth", users)
    # Reference: every turn prefilled from scratch with the whole conversation so far.
    history, expected = [], []
    for i, user in enumerate(users):
        history += tok.encode_chat_turn(user, None, first=(i == 0))
        res = decoding.generate(model, [history], N_NEW, GREEDY, tok.eos_ids)
        reply = res.tokens[0]
        expected.append(tok.decode([t for t in reply if t not in tok.eos_ids]))
        history += reply + ([] if res.stopped[0] else [tok.eos_ids[-1]])
    assert replies(proc.stdout) == expected


def test_full_context_starts_a_new_conversation(ckpt):
    d, tok, model = ckpt
    users = ["Hello there, how are you", "Tell me about the river and the old farmer"]
    first = tok.encode_chat_turn(users[0], None, first=True)
    max_seq = len(first) + N_NEW + 4  # room for the first exchange only
    proc = chat(d / "model.pth", users, "--max_seq_length", str(max_seq))
    assert "[context full" in proc.stdout
    # After the reset the second message is answered as the first turn of a new conversation.
    fresh = decoding.generate(model, [tok.encode_chat_turn(users[1], None, first=True)],
                              min(N_NEW, max_seq - len(tok.encode_chat_turn(users[1], None, first=True))),
                              GREEDY, tok.eos_ids).tokens[0]
    assert replies(proc.stdout)[1] == tok.decode([t for t in fresh if t not in tok.eos_ids])
