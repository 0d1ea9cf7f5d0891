"""Side by side with llama.cpp on this machine: the same random weights, decode tokens/s and 512-token prefill.

    python scripts/bench_llamacpp.py --llama_cpp ~/llama.cpp --tokenizer_path tokenizer.model --model stories110M

--llama_cpp is a llama.cpp checkout built with its benchmark and quantizer (`cmake -B build -DGGML_NATIVE=ON &&
cmake --build build --target llama-bench llama-quantize`; llama-cpp-python's sdist carries one in
vendor/llama.cpp); --tokenizer_path a Llama-2 SentencePiece tokenizer.model (32000 tokens: llama.cpp's converter
needs a real vocabulary, the benchmark never tokenizes). One random Hugging Face LlamaForCausalLM of the preset's
shape (transformers' own initialisation, seed 0) is converted twice: by our scripts/convert_hf_checkpoint.py and
by llama.cpp's convert_hf_to_gguf.py (BF16, then llama-quantize to Q8_0 and Q4_0). Then, one engine after the
other, each width:

    llama.cpp: llama-bench -t THREADS -p 512 -n 128 (tg128: decode from an empty context; pp512: prompt tokens/s)
    ours:      scripts/bench.py --compile (bf16, also with --cpu_kernels inductor; --quantize int8, also with
               --cpu_kernels inductor and w8a8; --quantize int4 --groupsize 32), and the time to first token of a
               512-token prompt (eager and --compile_prefill), as prompt tokens/s

and prints a Markdown table (also written to --out as JSON).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model_config import PRESETS, ModelArgs  # noqa: E402

WIDTHS = [  # (label, llama.cpp type, our bench.py flags)
    ("bf16", "BF16", []),
    ("bf16 inductor", "BF16", ["--cpu_kernels", "inductor"]),  # the generated loop, forced
    ("8-bit", "Q8_0", ["--quantize", "int8"]),
    ("8-bit inductor", "Q8_0", ["--quantize", "int8", "--cpu_kernels", "inductor"]),  # the generated loop
    ("8-bit w8a8", "Q8_0", ["--quantize", "int8", "--cpu_kernels", "w8a8"]),  # activations to int8 too, as Q8_0
    ("4-bit", "Q4_0", ["--quantize", "int4", "--groupsize", "32"]),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama_cpp", type=Path, required=True, help="llama.cpp checkout with build/bin/llama-bench")
    p.add_argument("--tokenizer_path", type=Path, required=True, help="a Llama-2 tokenizer.model (32000 tokens)")
    p.add_argument("--model", default="stories110M", choices=list(PRESETS))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="llama-bench repetitions and our --num_samples")
    p.add_argument("--widths", nargs="+", choices=[w[0] for w in WIDTHS], default=[w[0] for w in WIDTHS])
    p.add_argument("--work_dir", type=Path, help="keep the converted models here (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    return p


def run(cmd: list, **kwargs) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode:
        sys.exit(f"error: {' '.join(map(str, cmd[:3]))} ... failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def random_hf_model(name: str, tokenizer: Path, out: Path):
    """A random LlamaForCausalLM of the preset's shape, saved as a Hugging Face checkpoint with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    a = ModelArgs.from_name(name)
    if a.vocab_size != 32000:
        sys.exit(f"error: {name} has a {a.vocab_size}-token vocabulary; this needs a Llama-2-vocabulary preset")
    config = LlamaConfig(hidden_size=a.dim, intermediate_size=a.intermediate_size, num_hidden_layers=a.n_layers,
                         num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                         max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    shutil.copy(tokenizer, out / "tokenizer.model")


def gguf_models(hf_dir: Path, llama_cpp: Path, work: Path) -> dict:
    """{llama.cpp type: path}: BF16 by llama.cpp's converter, Q8_0 and Q4_0 quantized from it."""
    bf16 = work / "model-BF16.gguf"
    run([sys.executable, llama_cpp / "convert_hf_to_gguf.py", hf_dir, "--outtype", "bf16", "--outfile", bf16])
    paths = {"BF16": bf16}
    for kind in ("Q8_0", "Q4_0"):
        paths[kind] = work / f"model-{kind}.gguf"
        run([llama_cpp / "build" / "bin" / "llama-quantize", bf16, paths[kind], kind])
    return paths


def llama_bench(gguf: Path, llama_cpp: Path, threads: int, repeats: int) -> dict:
    out = run([llama_cpp / "build" / "bin" / "llama-bench", "-m", gguf, "-t", threads, "-p", 512, "-n", 128,
               "-r", repeats, "-o", "json"])
    rows = json.loads(out)
    prompt = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    decode = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"decode_tokens_per_sec": decode["avg_ts"], "prefill_tokens_per_sec": prompt["avg_ts"]}


def ours(checkpoint: Path, flags: list, repeats: int, work: Path) -> dict:
    """Decode tokens/s (--compile) and 512-token prefill tokens/s (eager prefill and --compile_prefill)."""
    bench = [sys.executable, ROOT / "scripts" / "bench.py", "--checkpoint_path", checkpoint, *flags]
    metrics = work / "metrics.json"
    run([*bench, "--compile", "--num_samples", repeats, "--metrics_json", metrics])
    result = {"decode_tokens_per_sec": json.loads(metrics.read_text())["tokens_per_sec"]}
    for key, extra in (("prefill_tokens_per_sec", []),
                       ("compiled_prefill_tokens_per_sec", ["--compile", "--compile_prefill"])):
        run([*bench, *extra, "--prompt_length", 512, "--max_new_tokens", 2, "--num_samples", repeats,
             "--metrics_json", metrics])
        result[key] = 512 / json.loads(metrics.read_text())["time_to_first_token_s"]
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    for need in (args.llama_cpp / "build" / "bin" / "llama-bench", args.llama_cpp / "convert_hf_to_gguf.py",
                 args.tokenizer_path):
        if not need.is_file():
            sys.exit(f"error: not found: {need}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        hf_dir = work / "hf"
        check_work_dir(work, args.model)
        if not (hf_dir / "model.pth").is_file():  # ours is written beside the HF files
            random_hf_model(args.model, args.tokenizer_path, hf_dir)
            run([sys.executable, ROOT / "scripts" / "convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir])
        ggufs = {kind: work / f"model-{kind}.gguf" for _, kind, _ in WIDTHS}
        if not all(p.is_file() for p in ggufs.values()):
            ggufs = gguf_models(hf_dir, args.llama_cpp, work)
        results = []
        print("| model, width | llama.cpp decode tok/s | ours decode tok/s | ours ÷ llama.cpp | llama.cpp pp512 tok/s "
              "| ours pp512 tok/s (eager / compiled prefill) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, kind, flags in (w for w in WIDTHS if w[0] in args.widths):
            results.append({"width": label, "llama.cpp": kind, "ours": " ".join(flags) or "bf16",
                            "llama_cpp_result": llama_bench(ggufs[kind], args.llama_cpp, args.threads, args.repeats),
                            "our_result": ours(hf_dir / "model.pth", flags, args.repeats, work)})
            print_row(args.model, results[-1])
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "results": results}, indent=2))


def check_work_dir(work: Path, model: str):
    """The models kept in --work_dir are reused by a later run: only by a run of the same preset."""
    mark = work / "preset.txt"
    if mark.is_file() and mark.read_text().strip() != model:
        sys.exit(f"error: --work_dir {work} holds {mark.read_text().strip()}'s models, not {model}'s: give each "
                 "preset its own folder")
    if not mark.is_file() and (work / "hf").exists():
        sys.exit(f"error: --work_dir {work} holds models of an unknown preset: give each preset its own folder")
    work.mkdir(parents=True, exist_ok=True)
    mark.write_text(model + "\n")


def print_row(model: str, r: dict):
    lc, us = r["llama_cpp_result"], r["our_result"]
    ratio = us["decode_tokens_per_sec"] / lc["decode_tokens_per_sec"]
    print(f"| {model} {r['width']} | {lc['decode_tokens_per_sec']:.1f} ({r['llama.cpp']}) | "
          f"{us['decode_tokens_per_sec']:.1f} ({r['ours']}) | {ratio:.2f} | "
          f"{lc['prefill_tokens_per_sec']:.0f} | {us['prefill_tokens_per_sec']:.0f} / "
          f"{us['compiled_prefill_tokens_per_sec']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
