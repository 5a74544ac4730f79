"""Process settings that make XLA:CPU fast; entry points call `configure()` first thing, before
JAX initialises its backend (XLA_FLAGS are read once, at backend start-up).

1. malloc (glibc): XLA:CPU allocates every intermediate buffer of a step with malloc and frees it
   after. glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmap()s and
   returns them on free(), so every step page-faults its large activations in again, 4 KiB at a
   time: a 300 MB im2col took 290 ms this way and 44 ms from a reused heap (2-core VM). We stop
   glibc from mmap-ing and trimming, so freed memory is reused. Memory is then held at the
   process's peak (it is never returned to the OS), which is what a training process wants.
   Only on Linux/glibc, only when JAX's default backend will be the CPU, and only through
   mallopt() in this process: child processes are unaffected.
2. XLA flags: CPU_XLA_FLAGS, appended to XLA_FLAGS unless the user already set those flags.

Everything is skipped when VI_SIMSIAM_CPU_SETUP=0.
"""

import ctypes
import ctypes.util
import os
import sys

# Flags that measured faster on XLA:CPU for the training step (README, Benchmarks).
CPU_XLA_FLAGS: tuple[str, ...] = ()

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_configured = False


def _cpu_backend_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    # No accelerator plugin installed -> CPU. (Importing jax here would be too early.)
    import importlib.util
    return not any(importlib.util.find_spec(name) for name in
                   ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu"))


def tune_malloc() -> bool:
    """Keeps freed memory in glibc's heap for reuse (no mmap for large blocks, no trimming).
    Returns whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena: glibc's per-thread arenas mmap any block above 64 MiB whatever M_MMAP_MAX says,
    # and XLA runs its programs on its own threads.
    ok = mallopt(_M_ARENA_MAX, 1)
    ok &= mallopt(_M_MMAP_MAX, 0)
    ok &= mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim
    ok &= mallopt(_M_TOP_PAD, 64 * 2**20)
    return bool(ok)


def configure() -> dict:
    """Applies the CPU settings once (see module docstring); returns what was done."""
    global _configured
    done = {"malloc": False, "xla_flags": []}
    if _configured or os.environ.get("VI_SIMSIAM_CPU_SETUP", "1") == "0":
        return done
    _configured = True
    if not _cpu_backend_expected():
        return done
    done["malloc"] = tune_malloc()
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    added = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in names]
    if added:
        os.environ["XLA_FLAGS"] = " ".join(flags + added)
    done["xla_flags"] = added
    return done
