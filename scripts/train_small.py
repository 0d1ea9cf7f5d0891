"""Train a small Llama on a local text file, so quantization, evaluation and speculative decoding have a model
with real (not random) behaviour to measure when no pretrained weights can be downloaded.

    python scripts/train_small.py --text_file wiki.valid.txt --tokenizer_path tokenizer.model \
        --out checkpoints/small-wiki --minutes 10

Writes model.pth and model_config.json (what generate.py, quantize.py and eval.py load) and links the tokenizer.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from cli import check_at_least, check_output_folder, check_output_path, cli_main, read_text_file  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checkpoint import TOKENIZER_NAME, atomic_save  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import CONFIG_NAME, ModelArgs  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def train(model: Transformer, data: torch.Tensor, steps: int, seq_len: int, batch_size: int, lr: float,
          minutes: float = 0.0, seed: int = 0, log=print) -> list:
    """AdamW on random windows of `data` with linear warm-up and cosine decay, in bfloat16 autocast (AMX on
    recent Intel CPUs). Stops after `steps`, or earlier after `minutes` > 0. Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, losses, t0 = max(1, steps // 20), [], time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s")
        if minutes and time.perf_counter() - t0 > minutes * 60:
            log(f"time budget reached after {step + 1} steps")
            break
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text_file", type=Path, required=True)
    p.add_argument("--tokenizer_path", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--dim", type=int, default=288)
    p.add_argument("--n_layers", type=int, default=6)
    p.add_argument("--n_heads", type=int, default=6)
    p.add_argument("--n_kv_heads", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=0.0, help="stop early after this long (0: no limit)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    cli_main(run, p.parse_args(argv))


def check_args(args):
    check_at_least(args, dim=1, n_layers=1, n_heads=1, n_kv_heads=1, seq_len=2, batch_size=1, steps=1,
                   minutes=0.0, lr=0.0)
    check_output_folder(args.out, "--out")
    for name in ("model.pth", CONFIG_NAME) if args.out.is_dir() else ():
        check_output_path(args.out / name, "--out", force=args.force)


def run(args) -> int:
    check_args(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    text = read_text_file(args.text_file, "text file")
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(data) <= args.seq_len + 1:
        raise ValueError(f"{args.text_file} has {len(data)} tokens: too few for --seq_len {args.seq_len}")
    config = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                       vocab_size=tokenizer.vocab_size, max_seq_len=args.seq_len)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    for name, param in model.named_parameters():  # GPT-2 style init; the norms keep their ones
        if param.dim() > 1:
            torch.nn.init.normal_(param, 0.0, 0.02)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(data)} training tokens",
          file=sys.stderr)
    train(model, data, args.steps, args.seq_len, args.batch_size, args.lr, args.minutes, args.seed,
          log=lambda s: print(s, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_save({k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}, args.out / "model.pth")
    atomic_save(config, args.out / CONFIG_NAME, save=lambda c, path: c.save(path))
    link = args.out / TOKENIZER_NAME
    if not link.exists():
        os.symlink(args.tokenizer_path.resolve(), link)
    print(f"wrote {args.out / 'model.pth'}")
    return 0


if __name__ == "__main__":
    main()
