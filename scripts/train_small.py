"""Train a small Llama on a local text file, so quantization, evaluation and speculative decoding have a model
with real (not random) behaviour to measure when no pretrained weights can be downloaded.

    python scripts/train_small.py --text_file wiki.valid.txt --tokenizer_path tokenizer.model \
        --out checkpoints/small-wiki --minutes 10
    python scripts/train_small.py --text_file code.txt --vocab_size 4096 --out checkpoints/small-code

Writes model.pth and model_config.json (what generate.py, quantize.py and eval.py load) and links the tokenizer,
or with --vocab_size trains a SentencePiece tokenizer on the text first (a small vocabulary: most of a small model's
training time would otherwise go to a 32,000-row output layer) and writes it beside them.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import (SEED_RANGE, check_at_least, check_output_folder, check_output_path,  # noqa: E402
                            check_ranges, cli_main, read_text_file)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama_fast.checkpoint import (TOKENIZER_NAME, check_is_file, check_shapes, read_config,  # noqa: E402
                                   read_state_dict)
from llama_fast.integrity import save_checkpoint  # noqa: E402
from llama_fast.writing import atomic_save  # noqa: E402
from llama_fast.cpu.choice import has_16bit_gemm  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import CONFIG_NAME, ModelArgs  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def train(model: Transformer, data: torch.Tensor, steps: int, seq_len: int, batch_size: int, lr: float,
          minutes: float = 0.0, seed: int = 0, log=print, repeat: "Repeats | None" = None, bf16: bool = True) -> list:
    """AdamW on random windows of `data` with linear warm-up and cosine decay, in bfloat16 autocast if bf16 (AMX on
    recent Intel CPUs; without AVX-512 BF16 a bf16 GEMM is ~8x slower than float32's, and a step 40x: main() asks
    llama_fast.cpu.choice.has_16bit_gemm). Stops after `steps`, or earlier after `minutes` > 0. Returns the loss per
    step. repeat: that fraction of each batch are repeat windows (Repeats.window)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, losses, t0 = max(1, steps // 20), [], time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        for row in range(round(repeat.fraction * batch_size) if repeat else 0):
            batch[row] = repeat.window(batch[row], gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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


@dataclass
class Repeats:
    """Training windows that teach a request to repeat, what an instruction-tuned model does when asked to copy (the
    case prompt lookup exists for): BOS, a passage, the request, the passage again, cut to the window's length. The
    passage takes 10-45% of the window; random_fraction of the passages are random token ids instead of the text:
    copying is then the only way to lower the loss, and a small model learns it in minutes instead of hours. The
    request comes as it is encoded alone or as it is encoded after text (a prompt encoded whole: SentencePiece's
    word-start piece is then not there), half each."""
    fraction: float  # of each batch
    requests: tuple[list[int], list[int]]  # the request's ids alone and after text
    bos: int | None  # a prompt's first token (None: the tokenizer has none)
    random_ids: tuple[int, int] = (0, 0)  # [lo, hi) of the random passages' ids
    random_fraction: float = 0.0

    def window(self, window: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(window)
        length = int(n * (0.1 + 0.35 * uniform(gen)))
        passage = torch.randint(*self.random_ids, (length,), generator=gen) if uniform(gen) < self.random_fraction \
            else window[:length]
        request = torch.tensor(self.requests[uniform(gen) < 0.5], dtype=torch.long)
        bos = torch.tensor([] if self.bos is None else [self.bos], dtype=torch.long)
        return torch.cat([bos, passage, request, passage, window[length:]])[:n]


def uniform(gen: torch.Generator) -> float:
    return torch.rand((), generator=gen).item()


def request_ids(tokenizer, request: str) -> tuple[list[int], list[int]]:
    """The request's token ids encoded alone, and as they follow text in a prompt encoded whole."""
    alone = tokenizer.encode(request, bos=False)
    lead = tokenizer.encode("x", bos=False)
    after = tokenizer.encode("x" + request, bos=False)
    return alone, after[len(lead):] if after[:len(lead)] == lead else alone


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text_file", type=Path, required=True)
    p.add_argument("--tokenizer_path", type=Path, help="the tokenizer to use (or --vocab_size)")
    p.add_argument("--vocab_size", type=int, help="instead: train a SentencePiece BPE tokenizer of this size")
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
    p.add_argument("--repeat_fraction", type=float, default=0.0, help="this fraction of the training windows are a "
                   "passage, --repeat_request, and the passage again (a model that copies when asked)")
    p.add_argument("--repeat_request", default="\n\nThe same text again, unchanged:\n\n")
    p.add_argument("--random_passages", type=float, default=0.0, help="this fraction of the repeat windows copy random "
                   "token ids instead of a passage of the text (the model learns to copy much sooner)")
    p.add_argument("--init", type=Path, help="go on training this model.pth (its shape: --dim etc. are not used; "
                   "the same tokenizer) instead of starting from random weights")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    cli_main(run, p.parse_args(argv))


def check_args(args):
    check_at_least(args, dim=1, n_layers=1, n_heads=1, n_kv_heads=1, seq_len=2, batch_size=1, steps=1,
                   minutes=0.0, lr=0.0, vocab_size=260,  # vocab: 256 byte-fallback ids + 4
                   repeat_fraction=0.0, random_passages=0.0)
    check_ranges(args, seed=SEED_RANGE)
    for name in ("repeat_fraction", "random_passages"):
        if getattr(args, name) > 1:
            raise ValueError(f"--{name} must be at most 1, not {getattr(args, name)}")
    if (args.tokenizer_path is None) == (args.vocab_size is None):
        raise ValueError("give one of --tokenizer_path and --vocab_size")
    if args.init and args.vocab_size:
        raise ValueError("--init goes on with the model's own tokenizer: give --tokenizer_path, not --vocab_size")
    if args.init:
        check_is_file(args.init, "--init checkpoint")
    check_output_folder(args.out, "--out")
    for name in ("model.pth", CONFIG_NAME) + ((TOKENIZER_NAME,) if args.vocab_size else ()):
        if args.out.is_dir():
            check_output_path(args.out / name, "--out", force=args.force)


def train_tokenizer(text: str, vocab_size: int, path: Path):
    """A Llama-2-like SentencePiece BPE model of the text's lines: byte fallback, unk 0, bos 1, eos 2; spaces kept
    as they are (indentation), runs of them as pieces."""
    import sentencepiece as spm

    lines = [line for line in text.splitlines() if line.strip()]
    with open(path.with_suffix(".tmp"), "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            input_sentence_size=200_000, shuffle_input_sentence=True, minloglevel=2)
    os.replace(path.with_suffix(".tmp"), path)


def initial_model(args, vocab_size: int) -> Transformer:
    """Random weights in the shape the arguments give, or --init's model in float32."""
    torch.manual_seed(args.seed)
    if args.init:
        config = read_config(args.init)
        if config.vocab_size != vocab_size:
            raise ValueError(f"--init {args.init} has a vocabulary of {config.vocab_size}, the tokenizer "
                             f"{vocab_size}: give the tokenizer it was trained with")
        if args.seq_len > config.max_seq_len:
            raise ValueError(f"--seq_len {args.seq_len} is longer than --init's context of {config.max_seq_len}")
        state = read_state_dict(args.init)
        model = Transformer(config)
        if set(state) != set(model.state_dict()):
            raise ValueError(f"--init {args.init} is not a plain (unquantized) checkpoint of its config's shape")
        check_shapes(state, model, args.init.parent / CONFIG_NAME)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model
    config = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                       vocab_size=vocab_size, max_seq_len=args.seq_len)
    model = Transformer(config)
    for name, param in model.named_parameters():  # GPT-2 style init; the norms keep their ones
        if param.dim() > 1:
            torch.nn.init.normal_(param, 0.0, 0.02)
    return model


def run(args) -> int:
    check_args(args)
    text = read_text_file(args.text_file, "text file")
    if args.vocab_size:
        args.out.mkdir(parents=True, exist_ok=True)
        args.tokenizer_path = args.out / TOKENIZER_NAME
        train_tokenizer(text, args.vocab_size, args.tokenizer_path)
    tokenizer = load_tokenizer(args.tokenizer_path)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(data) <= args.seq_len + 1:
        raise ValueError(f"{args.text_file} has {len(data)} tokens: too few for --seq_len {args.seq_len}")
    model = initial_model(args, tokenizer.vocab_size)
    config = model.config
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(data)} training tokens",
          file=sys.stderr)
    # random passages: ids past unk, bos, eos and the 256 byte pieces of a SentencePiece tokenizer like ours
    repeat = Repeats(args.repeat_fraction, request_ids(tokenizer, args.repeat_request), tokenizer.bos_id,
                     (min(259, tokenizer.vocab_size - 1), tokenizer.vocab_size), args.random_passages)
    bf16 = has_16bit_gemm()
    print(f"training in {'bfloat16 autocast' if bf16 else 'float32 (the bf16 GEMM is slow on this CPU)'}",
          file=sys.stderr)
    train(model, data, args.steps, args.seq_len, args.batch_size, args.lr, args.minutes, args.seed,
          log=lambda s: print(s, file=sys.stderr, flush=True), repeat=repeat, bf16=bf16)
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint({k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()},
                    args.out / "model.pth")
    atomic_save(config, args.out / CONFIG_NAME, save=lambda c, path: c.save(path))
    link = args.out / TOKENIZER_NAME
    if not link.exists() and not args.vocab_size:
        os.symlink(args.tokenizer_path.resolve(), link)
    print(f"wrote {args.out / 'model.pth'}")
    return 0


if __name__ == "__main__":
    main()
