"""Decode-speed benchmark: tokens/s and the fraction of the memory-bandwidth roofline, both measured here.

    python scripts/bench.py --model stories110M --compile
    python scripts/bench.py --checkpoint_path checkpoints/<repo>/model.pth --compile --batch_size 4

By default the preset is built with random weights (speed does not depend on their values), so no download or
tokenizer is needed. The roofline is tokens/s x weight bytes / the read bandwidth this process measures on a
buffer as large as the weights: 1.0 means every decode step streams the weights at the speed of a plain read.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generate import (CONFIG_NAME, PRECISIONS, SamplingConfig, compile_steps, decode_one_token, default_device,  # noqa: E402
                      generate, load_model, peak_memory_bytes, prefill, weight_bytes, write_json)
from model import PRESETS, ModelArgs, Transformer  # noqa: E402


def random_model(name: str, device, dtype, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    model = model.to_empty(device=device).to(dtype)
    for name_, p in model.named_parameters():
        if name_.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def quantized(model: Transformer, mode: str, groupsize: int, device, dtype) -> Transformer:
    """Round-to-nearest quantize in memory, then load through a real quantized checkpoint file (what
    generate.py would run)."""
    import tempfile
    from quantize import quantize_model
    state, meta = quantize_model(model, mode, groupsize, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save(Path(tmp) / CONFIG_NAME)
        torch.save({"quantization": meta, "state_dict": {k: v.cpu() for k, v in state.items()}}, Path(tmp) / "q.pth")
        del state, model
        return load_model(Path(tmp) / "q.pth", device, dtype)


def measure_bandwidth(device, nbytes: int, repeats: int = 10) -> float:
    """Read bandwidth in bytes/s: the median time to sum a buffer of nbytes (at least 256 MiB, so it is not
    served from cache any more than the weights are)."""
    device = torch.device(device)
    buf = torch.ones(max(nbytes, 256 << 20) // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        buf.sum().item()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories110M", help=f"preset with random weights: {', '.join(PRESETS)}")
    p.add_argument("--checkpoint_path", type=Path, help="benchmark a real checkpoint instead of a preset")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16")
    p.add_argument("--device", default=default_device())
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--prompt_length", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--quantize", choices=("int8", "int4"), help="round-to-nearest weight-only quantization first")
    p.add_argument("--groupsize", type=int, default=32, help="int4 group size")
    p.add_argument("--metrics_json", type=Path)
    args = p.parse_args(argv)

    try:
        dtype = PRECISIONS[args.precision]
        if args.checkpoint_path:
            model, label = load_model(args.checkpoint_path, args.device, dtype), str(args.checkpoint_path)
        else:
            model, label = random_model(args.model, args.device, dtype), f"{args.model} (random weights)"
        if args.quantize:
            model, label = quantized(model, args.quantize, args.groupsize, args.device, dtype), \
                f"{label} {args.quantize}" + (f" g{args.groupsize}" if args.quantize != "int8" else "")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    wbytes = weight_bytes(model)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch_size, args.prompt_length), generator=gen).tolist()
    greedy = SamplingConfig(temperature=0)
    steps = compile_steps(args.device) if args.compile else (prefill, decode_one_token)

    def run():
        return generate(model, prompts, args.max_new_tokens, greedy, steps=steps)

    t0 = time.perf_counter()
    run()  # warm-up, and compilation with --compile
    compile_seconds = time.perf_counter() - t0 if args.compile else 0.0
    bandwidth = measure_bandwidth(args.device, wbytes)
    results = [run() for _ in range(args.num_samples)]
    bandwidth = max(bandwidth, measure_bandwidth(args.device, wbytes))  # the higher reading: a stricter roofline
    tps = statistics.median(r.decode_tokens_per_sec for r in results)
    ttft = statistics.median(r.time_to_first_token for r in results)
    metrics = {
        "model": label, "device": args.device, "precision": args.precision, "compile": args.compile, "quantize": args.quantize,
        "batch_size": args.batch_size, "tokens_per_sec": tps, "total_tokens_per_sec": tps * args.batch_size,
        "time_to_first_token_s": ttft, "weight_bytes": wbytes, "achieved_bandwidth_gbps": tps * wbytes / 1e9,
        "measured_bandwidth_gbps": bandwidth / 1e9, "roofline_fraction": tps * wbytes / bandwidth,
        "compile_seconds": compile_seconds, "peak_memory_bytes": peak_memory_bytes(args.device),
        "torch": torch.__version__,
    }
    print(f"{label} {args.precision} {'compiled' if args.compile else 'eager'} batch {args.batch_size} on "
          f"{args.device}: {tps:.1f} tokens/s, {metrics['achieved_bandwidth_gbps']:.1f} of "
          f"{metrics['measured_bandwidth_gbps']:.1f} GB/s = {metrics['roofline_fraction']:.0%} of roofline "
          f"(weights {wbytes / 1e6:.0f} MB, compile {compile_seconds:.0f}s)")
    if args.metrics_json:
        write_json(args.metrics_json, metrics)


if __name__ == "__main__":
    main()
