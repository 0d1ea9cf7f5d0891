"""What the command-line entry points share: the flags that name a model, device and precision, the checks every
argument and output location goes through before any work starts, and how a run ends (a user mistake or a fault
exits with one "error: ..." line, never a traceback; Ctrl-C exits 130).

Every entry point imports this module before torch, so that a Ctrl-C while the libraries load (seconds) also ends
in one line: the handler below is in place before anything heavy is imported.
"""
import os
import signal
import sys
from pathlib import Path


def _interrupted_while_loading(signum, frame):
    # Exits at once instead of raising KeyboardInterrupt: an exception raised inside a C extension's import can be
    # swallowed or turned into an ImportError (numpy's, under torch's `import numpy`, leaves the run going or failing
    # later with "cannot load module more than once"). cli_main hands Ctrl-C back to KeyboardInterrupt.
    sys.stdout.flush()
    print("error: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def _run_as_entry_point() -> bool:
    """True in `python generate.py` and the like; False when a test or a user's program imports this module (their
    Ctrl-C stays theirs)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    root = Path(__file__).resolve().parent.parent
    return main is not None and Path(main).resolve().parent in (root, root / "scripts")


# only over Python's own handler: an inherited SIG_IGN (nohup, `cmd &`) stays ignored
if _run_as_entry_point() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import argparse  # noqa: E402 -- after the handler, on purpose
import errno  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import torch  # noqa: E402

from llama_fast.writing import written_in_place  # noqa: E402
from llama_fast.cpu.kernels import KERNELS  # noqa: E402
from tokenizer import TokenizerError  # noqa: E402
import tp  # noqa: E402

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CHECKPOINT = Path("checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


CPU_KERNEL_CHOICES = ["auto", "tune", *KERNELS, "w8a8"]
CPU_KERNEL_HELP = ("CPU matmul: auto = by this CPU's features and the layers' sizes (llama_fast/cpu/choice.py); tune = "
                   "measured on this machine, once, and cached (seconds to minutes); addmv / onednn = that kernel for "
                   "float weights; inductor = a loop generated into the compiled step, for 16-bit and int8 weights; "
                   "w8a8 = int8 checkpoints also quantize activations per token to 8 bits, 7 on AVX2 (opt-in: "
                   "different numerics)")

CPU_GEMM_CHOICES = ["auto", "native", "float32"]
CPU_GEMM_HELP = ("CPU matmuls of several tokens (prefill, batches) in a 16-bit model: auto = in float32 where this "
                 "CPU has no 16-bit GEMM instructions (AVX-512 BF16, AMX), from 16 tokens (--cpu_kernels tune: "
                 "measured), native = in the model's dtype, float32 = always in float32")


def add_model_args(p: argparse.ArgumentParser):
    """--checkpoint_path, --tokenizer_path, --device, --precision, --cpu_kernels and --cpu_gemm, the same in every
    command."""
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--tokenizer_path", type=Path, help="default: tokenizer.model beside the checkpoint")
    p.add_argument("--device", default=default_device())
    p.add_argument("--precision", choices=PRECISIONS, default="bfloat16")
    p.add_argument("--cpu_kernels", choices=CPU_KERNEL_CHOICES, default="auto", help=CPU_KERNEL_HELP)
    p.add_argument("--cpu_gemm", choices=CPU_GEMM_CHOICES, default="auto", help=CPU_GEMM_HELP)


def add_kv_cache_arg(p: argparse.ArgumentParser, what: str = ""):
    """--kv_cache_dtype, the same in every command with a KV cache (generate.py, serve.py, eval.py)."""
    p.add_argument("--kv_cache_dtype", choices=["auto", "int8"], default="auto", help="how the KV cache stores keys "
                   "and values: auto, the model's dtype; int8, one byte each and a float16 scale per vector (1.9x "
                   f"the tokens in the same memory){what}")


def check_device(device: str):
    """cpu, cuda[:N] when CUDA is there and N exists, mps when present; anything else is one line."""
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS (Apple GPU) is not available on this machine")
    elif kind.type != "cpu":
        raise ValueError(f"--device {device}: not supported; use cpu, cuda or cuda:N")


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args(argv), and in `args.given` the flags the user typed (a flag left at its default, and one
    typed with the default's value, look alike otherwise: --interactive --num_samples 5 must still be refused)."""
    args = parser.parse_args(argv)
    defaults = {a: a.default for a in parser._actions}
    try:  # parsed again with every default suppressed: only what was typed lands in the namespace
        for a in defaults:
            a.default = argparse.SUPPRESS
        args.given = set(vars(parser.parse_args(argv)))
    finally:
        for a, default in defaults.items():
            a.default = default
    return args


def given(args, flag: str) -> bool:
    """Whether `flag` ("name", or "name=value" for one value of it) was typed; without args.given (a namespace made
    in code), whether it holds a value."""
    name, _, value = flag.partition("=")
    typed = name in args.given if hasattr(args, "given") else getattr(args, name, None) not in (None, False)
    return typed and (not value or str(getattr(args, name)) == value)


# Flags that only mean something with another flag or in one mode: (flag, what it needs, whether `args` has it).
# Each command lists its own and check_flag_rules reads them all in one place; a flag given without what it needs
# would be ignored, so it is refused instead.
MODEL_FLAG_RULES = [
    ("cpu_kernels=inductor", "needs --compile: its loops are generated into the compiled step", lambda a: a.compile),
]


def check_flag_rules(args, rules):
    for flag, needs, holds in rules:
        if given(args, flag) and not holds(args):
            name, _, value = flag.partition("=")
            raise ValueError(f"--{name}{' ' + value if value else ''} {needs}")


class DeviceDefault:
    """The const of a flag given without its number (--lookahead alone): the device's default. Not a string:
    argparse would pass a string const through the flag's type (int)."""

    def __repr__(self):
        return "the device's default"


DEVICE_DEFAULT = DeviceDefault()
SEED_RANGE = (0, 2 ** 64 - 1)  # torch.manual_seed takes any 64-bit unsigned value


def check_ranges(args, **ranges):
    """Each named flag of `args` (unless None) is a finite number in its [low, high] (None: unbounded)."""
    for name, (low, high) in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        finite = isinstance(value, int) or math.isfinite(value)  # an int past a float's range is still a number
        if not (finite and (low is None or value >= low) and (high is None or value <= high)):
            bounds = f"in [{low}, {high}]" if low is not None and high is not None else \
                f">= {low}" if low is not None else f"<= {high}"
            raise ValueError(f"--{name} must be {bounds}, got {value}")


def check_at_least(args, **minimums):
    """Each named flag of `args` (unless None) is a finite number >= its minimum: check_at_least(args, steps=1)."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= low):
            raise ValueError(f"--{name} must be {'a finite number ' if isinstance(low, float) else ''}>= {low}, "
                             f"got {value}")


def free_memory(device: str) -> int | None:
    """Bytes that can still be allocated on `device`: CUDA's free memory, the system's MemAvailable for the CPU;
    None where it cannot be known (MPS, a system without /proc/meminfo)."""
    kind = torch.device(device)
    if kind.type == "cuda":
        return torch.cuda.mem_get_info(kind)[0]
    if kind.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def check_memory(nbytes: int, device: str, what: str, hint: str = ""):
    """An allocation sized from the user's flags is refused before it is made, in one line saying how much it
    needed, rather than ending in the allocator's traceback or, on the CPU, the kernel's OOM killer."""
    free = free_memory(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:.2f} GiB but {device} has {free / 2**30:.2f} GiB free"
                         f"{hint}")


def check_text(text: str, what: str) -> str:
    """Text from the command line that will be encoded: bytes that are not UTF-8 arrive as surrogate escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = os.fsencode(text[e.start:e.end]).hex(" ")
        raise ValueError(f"{what} is not valid UTF-8 (byte {bad} at character {e.start}); check the terminal's "
                         "encoding") from None
    return text


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file the user named, or one line saying why it cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a text file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None


def check_output_folder(path: Path, what: str):
    """An output folder is a folder or can be made: no file in its place, and its nearest existing parent is a
    writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {parent} is not a writable folder")


def check_output_path(path: Path | None, what: str, force: bool = True):
    """Before any work: an output file's folder exists and is writable, the path is not a folder, and without
    `force` no file is there yet (nothing a user owns is replaced unasked). `what` names it in the error (the
    flag, or "output"). None (no output asked for) passes. A device or /dev/stdout is written in place: it only
    has to be writable."""
    if path is None:
        return
    path = Path(path)
    if written_in_place(path):
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"{what} {path} is not writable")
        return
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    folder = path.resolve().parent  # through a symlink: the folder of the file it points to
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {path}: {path.parent} is a file, not a folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {path}: folder {path.parent} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: folder {path.parent} is not writable")
    if path.exists() and not force:
        raise ValueError(f"{what} {path} exists; pass --force to replace it")


def same_file(a: Path, b: Path) -> bool:
    """a and b name one file: the same path once symlinks are followed, or (both there) one inode (a hard link)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_outputs(outputs: dict, inputs: dict):
    """No file a run writes is one it reads, or another of its outputs ({what: path}; None: not asked for). Writing
    over an input would destroy it (weights replaced by a trace, a config by metrics), so --force does not allow it.
    Devices and /dev/stdout are written in place and destroy nothing."""
    outs = [(what, Path(p)) for what, p in outputs.items() if p is not None and not written_in_place(Path(p))]
    ins = [(what, Path(p)) for what, p in inputs.items() if p is not None]
    for i, (what, out) in enumerate(outs):
        for other, path in ins + outs[:i]:
            if same_file(out, path):
                raise ValueError(f"{what} {out} is {other} ({path}): writing it would destroy it; choose another "
                                 "file")


class Terminated(Exception):
    """SIGTERM: under torchrun, the launcher stopping this process because another one failed."""


def _terminate(signum, frame):
    raise Terminated


def fault_message(e: BaseException) -> str | None:
    """The one line for a fault that is not a mistake in the code: a full disk, a file the OS refuses, a dead peer
    process under torchrun, a stop by signal. None: a bug, which keeps its traceback."""
    if isinstance(e, Terminated):
        return ("stopped by torchrun (SIGTERM): another process of the launch failed" if tp.world_size() > 1 else
                "terminated (SIGTERM)")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on device{f' writing {e.filename}' if e.filename else ''}"
    if isinstance(e, OSError) and type(e).__module__ == "builtins":  # permissions, read-only file systems, ...
        return str(e)
    if isinstance(e, RuntimeError) and tp.world_size() > 1 and _peer_lost(str(e)):
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0])  # without gloo's source file and line
        return f"another process of this torchrun launch stopped ({detail[:160]})"
    return None


def _peer_lost(message: str) -> bool:
    return any(s in message for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "Socket Timeout", "timed out", "Timeout"))


def cli_main(run, args):
    """Return when run(args) returns 0, else exit with its code. A user mistake (ValueError, FileNotFoundError,
    TokenizerError) or a fault (see fault_message; a full disk arrives as writing.atomic_save's ENOSPC OSError)
    exits 1 with one "error: ..." line instead of a traceback; Ctrl-C exits 130 and SIGTERM 143, with one line each.
    Under torchrun only rank 0 prints; errors are reported by every rank, and the process group is torn down however
    the run ends."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C unwinds (finally blocks run)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with tp.rank0_output():
            code = run(args)
        if code:
            sys.exit(code)
    except (FileNotFoundError, ValueError, TokenizerError) as e:  # user mistakes: one line, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError, Terminated) as e:
        message = fault_message(e)
        if message is None:
            raise
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        tp.destroy_dist()
