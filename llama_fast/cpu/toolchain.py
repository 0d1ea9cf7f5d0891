"""Who builds and runs inductor's generated loops on CPU (the C++ compiler, the OpenMP runtime): their speed
depends on it as much as on the CPU, so tune.py keys its measurements by it, the metrics report it, and a setup
known to be slow gets a warning."""
import functools
import glob
import os
import re
import sys
from pathlib import Path


def inductor_build() -> str:
    """Who builds and runs the generated loops: inductor's C++ compiler (the CXX environment variable or
    torch._inductor.config.cpp.cxx; g++ unless set) and whether LLVM's OpenMP runtime is preloaded. On an AVX2-only
    Zen 3, GCC 12 compiles ATen's integer vector loads through a stack buffer (the int8 loop: 1.2 G weights/s)
    where clang loads them directly (16.2, ATen's int8 kernel 10.6); but clang's loops run on LLVM's OpenMP
    runtime, which then spins beside torch's GNU one for the same cores unless it is the only one (preloaded)."""
    return f"{inductor_cxx()}, {'LLVM OpenMP preloaded' if llvm_openmp_preloaded() else 'GNU OpenMP'}"


def inductor_cxx() -> str:
    from torch._inductor import config
    return Path(str(config.cpp.cxx[-1])).name


def llvm_openmp_preloaded() -> bool:
    """LLVM's (or Intel's) OpenMP runtime in LD_PRELOAD: it then serves torch's GNU OpenMP calls as well."""
    preloaded = re.split(r"[: ]", os.environ.get("LD_PRELOAD", ""))
    return any(Path(p).name.startswith(("libomp", "libiomp5")) for p in preloaded)


def openmp_warning() -> str | None:
    """A one-line warning where clang builds the compiled steps (CXX=clang++) without LLVM's OpenMP runtime
    preloaded: two runtimes then take turns on the cores (tinyllama int8 decoded 4.5 tokens/s instead of 12.5)."""
    if "clang" not in inductor_cxx() or llvm_openmp_preloaded():
        return None
    libomp = next(iter(sorted(glob.glob("/usr/lib/llvm-*/lib/libomp.so.5"))), "<path of libomp.so.5>")
    return ("warning: inductor builds with clang but LLVM's OpenMP runtime is not preloaded, so two OpenMP runtimes "
            f"compete for the cores: run with LD_PRELOAD={libomp} (README: How it is fast)")


@functools.cache
def say_once(message: str):  # a draft and its target are loaded alike: one warning
    print(message, file=sys.stderr)
