"""The CPU runtime a lorakit process runs on: which OpenMP, which allocator, how many threads; and,
on request, the tuned one.

torch's CPU wheel brings GNU OpenMP (libgomp) and glibc's malloc. On Intel Xeons, Intel's OpenMP
(libiomp5, from the `intel-openmp` wheel) with its threads kept spinning briefly between parallel
regions measured faster: serving 16 adapters 47 -> 107 tok/s on a 2-core Xeon (issue 20), 37 -> 63
on a 2-core EPYC, a LoRA train step x1.14 (bench/runtime.py); vLLM's CPU guide asks for the same. Which runtime wins is a property of the CPU (BENCHMARKS.md, "The CPU
runtime", per CPU class), and an OpenMP runtime can only be chosen before the process loads torch,
so the switch is one environment variable, `LORAKIT_RUNTIME=tuned` (or `lorakit --runtime tuned`):
the command re-executes itself once with Intel OpenMP (and tcmalloc, where the system has it)
preloaded, the way torch's own `torch.backends.xeon.run_cpu` launcher does. `stock` (the default)
runs as installed. Either way, `describe()` is printed at start-up by train, serve and demo.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

MODES = ("stock", "tuned")
CHILD = "LORAKIT_RUNTIME_CHILD"          # set in the re-executed process, so it happens once
TUNED_OMP = {"KMP_BLOCKTIME": "1", "KMP_TPAUSE": "0"}   # spin 1 ms after a region, as IPEX/vLLM advise
_LIBS = {"libiomp5": "Intel OpenMP", "libgomp": "GNU OpenMP", "libomp.so": "LLVM OpenMP",
         "libtcmalloc": "tcmalloc", "libjemalloc": "jemalloc"}


def loaded_libraries() -> list[str]:
    """Which runtime libraries this process has mapped (Linux: /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return [name for key, name in _LIBS.items() if key in maps]


def describe() -> str:
    """One line: threads, the OpenMP runtime and the allocator in use, and how to switch."""
    import torch

    libs = loaded_libraries()
    omp = next((lib for lib in libs if "OpenMP" in lib), "no OpenMP mapped")
    alloc = next((lib for lib in libs if lib in ("tcmalloc", "jemalloc")), "glibc malloc")
    mode = os.environ.get("LORAKIT_RUNTIME", "stock")
    line = f"runtime: {mode}, {torch.get_num_threads()} threads, {omp}, {alloc}"
    if mode == "stock":
        line += "; LORAKIT_RUNTIME=tuned preloads Intel OpenMP (measured x1.1-2.3 faster on Xeon and EPYC: BENCHMARKS.md)"
    elif "Intel OpenMP" not in libs:
        line += f"; Intel OpenMP not found ({missing_hint()})"
    return line


def missing_hint() -> str:
    return "pip install intel-openmp, into the environment lorakit runs in"


def iomp_library() -> Path | None:
    """libiomp5.so from the `intel-openmp` wheel (it installs into <prefix>/lib), if installed."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = Path(prefix) / "lib" / "libiomp5.so"
        if path.is_file():
            return path
    return None


def tcmalloc_library() -> Path | None:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/lib/aarch64-linux-gnu"):
        for name in ("libtcmalloc.so.4", "libtcmalloc_minimal.so.4"):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    return None


def tuned_environment(env: dict) -> dict:
    """`env` with Intel OpenMP (and tcmalloc, if present) preloaded and its thread settings."""
    iomp = iomp_library()
    if iomp is None:
        raise RuntimeError(f"LORAKIT_RUNTIME=tuned needs Intel OpenMP: {missing_hint()} (or run with "
                           "LORAKIT_RUNTIME=stock)")
    preload = [str(iomp)] + ([str(tcmalloc_library())] if tcmalloc_library() else [])
    previous = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    return {**TUNED_OMP, **env, "LD_PRELOAD": ":".join(dict.fromkeys(preload + previous)), CHILD: "1",
            "LORAKIT_RUNTIME": "tuned"}


def apply(mode: str | None, argv: list[str]) -> None:
    """Re-execute `python -m lorakit ARGV` under the tuned runtime when asked and not done yet."""
    mode = mode or os.environ.get("LORAKIT_RUNTIME", "stock")
    if mode not in MODES:
        raise ValueError(f"LORAKIT_RUNTIME / --runtime = {mode!r}: expected one of {MODES}")
    os.environ["LORAKIT_RUNTIME"] = mode
    if mode == "stock" or os.environ.get(CHILD):
        return
    env = tuned_environment(dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lorakit", *argv], env)


def best_seconds(fn, repeat: int = 5) -> float:
    """The fastest of `repeat` timed calls of `fn`, after one untimed warm-up (first-touch pages,
    kernel selection): what a start-up choice between two kernels, or a roofline, measures."""
    import time

    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
