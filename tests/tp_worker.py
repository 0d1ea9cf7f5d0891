"""Run by tests/test_tp.py under torchrun: loads each checkpoint sharded over the ranks (checkpoint.load_model with
tensor_parallel=True) and saves, from rank 0, what the test compares with a single process: the logits of the
prompt without and with the KV cache, and a greedy continuation.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/tp_worker.py OUT PROMPT N_NEW CKPT...

PROMPT is comma-separated token ids. TP_WORKER_FAIL_RANK=r makes rank r raise after its first forward (the other
ranks go on into the next collective): the launch must then end with a non-zero exit, not hang.
TP_WORKER_TIMEOUT_S sets the process-group timeout.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import decoding  # noqa: E402
from llama_fast import checkpoint  # noqa: E402
from sampling import SamplingConfig  # noqa: E402
import tp  # noqa: E402

torch.set_num_threads(1)


def main():
    out, prompt, n_new, *checkpoints = sys.argv[1:]
    prompt, n_new = [int(t) for t in prompt.split(",")], int(n_new)
    tp.maybe_init_dist("cpu", float(os.environ.get("TP_WORKER_TIMEOUT_S", tp.DEFAULT_TIMEOUT_S)))
    results = {}
    try:
        for path in checkpoints:
            model = checkpoint.load_model(path, "cpu", torch.float32, tensor_parallel=True)
            tokens = torch.tensor([prompt])
            with torch.inference_mode():
                logits = model(tokens)
                if os.environ.get("TP_WORKER_FAIL_RANK") == str(tp.rank()):
                    raise RuntimeError(f"rank {tp.rank()} fails on purpose")
                model.setup_caches(1, len(prompt) + n_new)
                cached_logits = model(tokens, torch.arange(len(prompt)))
            greedy = decoding.generate(model, [prompt], n_new, SamplingConfig(temperature=0))
            results[path] = {"logits": logits, "cached_logits": cached_logits, "tokens": greedy.tokens[0],
                             "kv_cache_shape": tuple(model.layers[0].attention.kv_cache.k_cache.shape)}
        if tp.rank() == 0:
            torch.save(results, out)
    finally:
        tp.destroy_dist()


if __name__ == "__main__":
    main()
