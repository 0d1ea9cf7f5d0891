"""Weight-only quantization as module swaps: int8 (per output channel), int4 (groupwise), int4-GPTQ.

    python quantize.py --checkpoint_path checkpoints/<repo>/model.pth --mode int8
    python quantize.py --checkpoint_path checkpoints/<repo>/model.pth --mode int4 --groupsize 32
    python quantize.py --checkpoint_path checkpoints/<repo>/model.pth --mode int4-gptq --groupsize 32 \
        --calibration_file wikitext-2-raw/wiki.train.raw

The output (model_int8.pth, model_int4.g32.pth, model_int4-gptq.g32.pth beside the input) describes itself: it
holds {"quantization": {...}, "state_dict": {...}}, and stores int4 weights in a portable layout that is packed
for the device's kernel when loaded, so one file runs on CPU and CUDA.
"""
# first, before torch: cli's Ctrl-C handler must be in place while the libraries load (see cli.py)
from llama_fast.cli import (check_at_least, check_device, check_flag_rules, check_output_path, check_outputs,
                            cli_main, parse)
import argparse
import sys
import time
from pathlib import Path

from llama_fast.checkpoint import check_is_file, check_vocab, files_read, load_model, tokenizer_file
from llama_fast.integrity import save_checkpoint
from llama_fast.quant.gptq import calibration_sequences, gptq_quantize_model, read_calibration_text
from llama_fast.quant.qlinear import GROUP_SIZES, quantize_model
from tokenizer import load_tokenizer

MODES = ("int8", "int4", "int4-gptq")


def output_path(checkpoint_path: Path, mode: str, groupsize: int) -> Path:
    suffix = "int8" if mode == "int8" else f"{mode}.g{groupsize}"
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_{suffix}.pth")


def gptq_only(flag: str) -> tuple:
    return flag, "is for --mode int4-gptq (calibration); other modes do not use it", lambda a: a.mode == "int4-gptq"


FLAG_RULES = [("groupsize", "is for int4 modes: int8 has one scale per output channel",  # see cli.check_flag_rules
               lambda a: a.mode != "int8"),
              *map(gptq_only, ("calibration_file", "calibration_tasks", "calibration_limit", "calibration_seq_length",
                               "percdamp", "blocksize", "tokenizer_path"))]


def check_args(args):
    check_device(args.device)
    if args.mode not in MODES:
        raise ValueError(f"unknown --mode {args.mode!r}; choose from {', '.join(MODES)}")
    check_flag_rules(args, FLAG_RULES)
    if args.mode != "int8" and args.groupsize not in GROUP_SIZES:
        raise ValueError(f"--groupsize must be one of {', '.join(map(str, GROUP_SIZES))}")
    check_at_least(args, calibration_limit=1, calibration_seq_length=2, percdamp=0.0, blocksize=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, required=True)
    p.add_argument("--mode", required=True, help=", ".join(MODES))
    p.add_argument("--groupsize", type=int, default=128, help=f"int4 group size: {', '.join(map(str, GROUP_SIZES))}")
    p.add_argument("--quantize_output", action=argparse.BooleanOptionalAction, default=True,
                   help="also quantize the output projection (gpt-fast does)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--device", default="cpu", help="where to run the quantization")
    g = p.add_argument_group("int4-gptq")
    g.add_argument("--calibration_file", type=Path, help="a local text file to calibrate on (e.g. WikiText)")
    g.add_argument("--calibration_tasks", nargs="+", metavar="TASK",
                   help="calibrate on lm-eval tasks' data (e.g. wikitext): needs lm-eval and its data cached")
    g.add_argument("--calibration_limit", type=int, default=128, help="number of calibration sequences")
    g.add_argument("--calibration_seq_length", type=int, default=2048,
                   help="tokens per calibration sequence (at most the model's context)")
    g.add_argument("--percdamp", type=float, default=0.01, help="Hessian dampening, a fraction of its mean diagonal")
    g.add_argument("--blocksize", type=int, default=128, help="columns quantized between lazy batch updates")
    g.add_argument("--tokenizer_path", type=Path, help="default: tokenizer.model beside the checkpoint")
    return p


def calibration(args):
    """(tokenizer, text, where the text came from) for GPTQ, read before the model is loaded so that calibration
    mistakes show at once."""
    text, source = read_calibration_text(args.calibration_file, args.calibration_tasks,
                                         max_chars=args.calibration_limit * args.calibration_seq_length * 16)
    return load_tokenizer(tokenizer_file(args.checkpoint_path, args.tokenizer_path)), text, source


def quantize_gptq(model, args, tokenizer, text: str, source: str) -> tuple[dict, dict]:
    check_vocab(tokenizer, model)
    seq_length = min(args.calibration_seq_length, model.config.max_seq_len)
    sequences = calibration_sequences(tokenizer, text, args.calibration_limit, seq_length)
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    state, meta = gptq_quantize_model(model.float(), sequences, args.groupsize, args.quantize_output, args.percdamp,
                                      args.blocksize)
    # calibration runs in float32; the tensors left unquantized are stored as they came
    state = {k: t if meta["layers"].get(k.rpartition(".")[0]) == "int4" else t.to(dtypes[k]) for k, t in state.items()}
    meta["gptq"] |= {"calibration_source": source, "calibration_seq_length": seq_length}
    print(f"calibrated on {len(sequences)} sequences ({meta['gptq']['calibration_tokens']} tokens) from {source}",
          file=sys.stderr)
    return state, meta


def quantize(args) -> tuple[Path, int]:
    """Check everything, quantize, write the output; returns its path and size in bytes."""
    check_args(args)
    check_is_file(args.checkpoint_path, "checkpoint")  # the input first: its folder is also the output's
    out = output_path(args.checkpoint_path, args.mode, args.groupsize)
    check_output_path(out, "output", force=args.force)
    check_outputs({"output": out}, {**files_read(args.checkpoint_path, args.tokenizer_path),  # even with --force
                                    "--calibration_file": args.calibration_file})
    calibration_data = calibration(args) if args.mode == "int4-gptq" else None
    model = load_model(args.checkpoint_path, args.device, precision=None, cpu_kernels="none")  # weights as stored
    if model.quantization:
        raise ValueError(f"{args.checkpoint_path} is already quantized")
    if calibration_data:
        state, meta = quantize_gptq(model, args, *calibration_data)
    else:
        state, meta = quantize_model(model, args.mode, args.groupsize, args.quantize_output)
    meta["source"] = str(args.checkpoint_path)
    state = {k: v.cpu() for k, v in state.items()}
    save_checkpoint({"quantization": meta, "state_dict": state}, out)
    kept = [f"{n} ({why})" for n, why in meta["layers"].items() if why not in ("int8", "int4")]
    if kept:
        print(f"not quantized: {'; '.join(kept)}", file=sys.stderr)
    return out, sum(v.numel() * v.element_size() for v in state.values())


def run(args) -> int:
    t0 = time.perf_counter()
    out, size = quantize(args)
    print(f"wrote {out} ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv=None):
    cli_main(run, parse(build_parser(), argv))


if __name__ == "__main__":
    main()
