"""What several test files share that is not a fixture: running generate.py, torchrun and a server as a user would, and the
statistics that check a sampler against a distribution (speculative and lookahead decoding)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from sampling import SamplingConfig, token_probs

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingConfig(temperature=0)
TP_PROMPT = "The quick dog sees a red bird and the old farmer"
N_NEW = 16
BASE = ["--max_new_tokens", str(N_NEW), "--num_samples", "1", "--temperature", "0", "--precision", "float32",
        "--device", "cpu"]

def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    # KINETO_LOG_LEVEL: a CUDA build of torch profiling on a machine with no GPU logs "ERROR ... gpuGetDeviceCount
    # failed" from its profiler library (seen with torch 2.11+cu130); not ours, and it would trip assert_ran_cleanly
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "KINETO_LOG_LEVEL": "5", **(env or {})}
    proc = subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          timeout=300)
    # bytes, decoded here: text mode would turn a generated "\r" into "\n"
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def assert_ran_cleanly(proc):
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr


V = 8  # a vocabulary this small lets the target's joint distribution over 3 tokens be enumerated (512 cells)
SAMPLING = SamplingConfig(temperature=1.0, top_k=6, top_p=0.9)  # truncation, so some tokens have probability 0
CONTEXT = [1, 5, 3, 7, 2, 6]


def fresh_chat_replies(model, tokenizer, template, users: list, n_new: int, system=None) -> list:
    """Each reply of a greedy chat as a fresh prefill of the whole conversation so far (the template's encoding,
    earlier replies as text) gives it: what a chat that keeps the conversation in its KV cache must answer."""
    from decoding import generate

    stop = [*tokenizer.eos_ids, *([template.end_of_turn] if template.end_of_turn is not None else [])]
    messages, replies = [{"role": "system", "content": system}] if system is not None else [], []
    for user in users:
        messages.append({"role": "user", "content": user})
        row = generate(model, [template.encode(messages)], n_new, SamplingConfig(temperature=0), stop).tokens[0]
        replies.append(tokenizer.decode([t for t in row if t not in stop]))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def next_token_tables(model, depth):
    """Distributions after CONTEXT + every continuation of up to depth - 1 tokens: table[k] is (V,) * k + (V,), on
    CPU (computed on the model's device)."""
    c = len(CONTEXT)
    grid = torch.cartesian_prod(*[torch.arange(V)] * (depth - 1)).reshape(-1, depth - 1)
    seqs = torch.cat([torch.tensor(CONTEXT).expand(len(grid), c), grid], 1)
    with torch.no_grad():
        logits = model(seqs.to(model.output.weight.device)).cpu()
    tables = []
    for k in range(depth):
        probs = token_probs(logits[:, c - 1 + k], SAMPLING).reshape((V,) * (depth - 1) + (V,))
        tables.append(probs[(slice(None),) * k + (0,) * (depth - 1 - k)])  # the later tokens do not matter
    return tables


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities (cells of probability 0 must be empty): cells expected fewer
    than 5 times are pooled."""
    counts, probs = counts.flatten().double(), expected_probs.flatten().double()
    assert counts[probs == 0].sum() == 0, "a token sequence the target cannot produce was produced"
    expected = probs * counts.sum()
    small = (expected < 5) & (probs > 0)
    obs = torch.cat([counts[~small & (probs > 0)], counts[small].sum()[None]])
    exp = torch.cat([expected[~small & (probs > 0)], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def joint(tables):
    p0, p1, p2 = tables
    return p0[:, None, None] * p1[:, :, None] * p2


def torchrun(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --standalone --nproc_per_node=2 ARGS, from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    # bytes, decoded here: text mode would turn a generated "\r" into "\n"
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout: float = 120):
    import httpx  # only where a server is tested: a GPU machine may lack the serving packages (gpu_check.sh)

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError("the server did not start")


KEY = "test-key"  # the API key the serving tests start servers with


class ServerProcess:
    def __init__(self, checkpoint_dir: Path, *flags, before: str = ""):
        """serve.py with flags; before: Python run before serve.main() in the server's process."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = ["-c", f"{before}\nimport serve\nserve.main()"] if before else ["serve.py"]
        self.proc = subprocess.Popen(
            [sys.executable, *command, "--checkpoint_path", str(checkpoint_dir / "model.pth"), "--device", "cpu",
             "--precision", "float32", "--port", str(self.port), "--block_size", "8", *map(str, flags)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until_healthy(self.proc, self.url)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("llama_fast")}

    def stop(self) -> str:
        """SIGTERM, and what the server wrote to stderr ("" if it had already stopped)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.communicate(timeout=60)[1]
        return ""
