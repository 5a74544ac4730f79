"""Process settings that make XLA:CPU fast. `vi_simsiam_jax.launch` calls `configure()` first in
every entry point, before JAX starts its backend (XLA_FLAGS are read once, at backend start-up,
and XLA's worker threads pick their malloc arena when they are created).

1. Memory. Every step, XLA:CPU mallocs one block for all of the step's intermediates and frees
   it when the step is done. glibc serves such blocks with a fresh mmap() and unmaps them on
   free(), so each step faults its pages in again (the block's size and the cost:
   benchmarks/README.md, "Memory"). Linux/glibc only; skipped when VI_SIMSIAM_MALLOC=0.
   a. Freed blocks are kept: one malloc arena (glibc's per-thread arenas mmap any block over
      64 MiB whatever the settings; XLA allocates from its own threads), no mmap and no trimming
      (mallopt() in this process; child processes are unaffected), so freed blocks are reused:
      no page faults after the first few steps. The cost: the process keeps its peak heap
      (about two step buffers more, because a step's block is sometimes freed only after the
      next step has allocated its own), and then stays flat. In a VM whose balloon device takes
      free pages back (free page reporting), memory given back to the kernel between steps may
      also cost the hypervisor's page faults on reuse.
   b. Transparent huge pages. Where the kernel gives them only to memory that asks for them
      (/sys/kernel/mm/transparent_hugepage/enabled is "madvise"), the process restarts itself
      once (same interpreter, same command line) with glibc's tunable glibc.malloc.hugetlb=1,
      so malloc asks for 2 MiB pages: a step's block then takes 512x fewer pages than with
      4 KiB ones, and the TLB misses far less. Only a program started from a file
      (`python -m ...`, `python script.py`) restarts; its children see the environment the
      user gave. Not needed where the setting is "always"; not done when GLIBC_TUNABLES already
      sets glibc.malloc.hugetlb.
2. XLA flags: CPU_XLA_FLAGS, appended to XLA_FLAGS unless the user set those flags already.
   `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` takes convolutions away from
   YNNPACK, which jaxlib 0.10.2 runs on one thread, and leaves them to XLA's multi-threaded
   Eigen convolution; YNNPACK keeps the dots (per-layer and step timings: benchmarks/README.md,
   "XLA flag").

The launcher applies them only when JAX will run on the CPU (`cpu_backend_expected`); nothing
is done with VI_SIMSIAM_CPU_SETUP=0.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pathlib
import pkgutil
import sys

CPU_XLA_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
# Set across the restart: the user's GLIBC_TUNABLES, restored after it.
_USER_TUNABLES = "_VI_SIMSIAM_USER_GLIBC_TUNABLES"

_configured = False


def accelerator_plugins() -> list[str]:
    """The installed JAX accelerator backends: PJRT plugins (jax[cuda12], jax[rocm], ... register
    under the `jax_plugins` entry points or namespace package) and libtpu (jax[tpu])."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def cpu_backend_expected() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS (or JAX_PLATFORM_NAME) names "cpu" first,
    or, when neither is set, no accelerator backend is installed. Decided without starting
    JAX's backends (that would read XLA_FLAGS before `configure` sets them)."""
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugins()


def tune_malloc() -> bool:
    """One arena, no mmap, no trimming (see module docstring, 1a). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_ARENA_MAX, 1)
    ok &= mallopt(_M_MMAP_MAX, 0)
    ok &= mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim
    ok &= mallopt(_M_TOP_PAD, 64 * 2**20)
    return bool(ok)


def _transparent_huge_pages_mode() -> str | None:
    """The bracketed choice in _THP_ENABLED ("always", "madvise", "never"); None if unknown."""
    try:
        setting = pathlib.Path(_THP_ENABLED).read_text()
    except OSError:
        return None
    return setting.split("[", 1)[-1].split("]", 1)[0] if "[" in setting else None


def huge_pages_for_malloc() -> bool:
    """Whether malloc's memory comes in transparent huge pages; where the kernel must be asked
    and the process can restart, first re-executes it with glibc.malloc.hugetlb=1 (see module
    docstring, 1b)."""
    if _USER_TUNABLES in os.environ:  # this is the restarted process
        user_tunables = os.environ.pop(_USER_TUNABLES)
        if user_tunables:
            os.environ["GLIBC_TUNABLES"] = user_tunables
        else:
            del os.environ["GLIBC_TUNABLES"]
        return True
    user_tunables = os.environ.get("GLIBC_TUNABLES", "")
    if _HUGE_PAGES_TUNABLE in user_tunables:
        return False  # the user's choice
    mode = _transparent_huge_pages_mode()
    if mode == "always":
        return True
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if mode != "madvise" or not main_file or sys.flags.interactive:
        return False
    os.environ[_USER_TUNABLES] = user_tunables
    os.environ["GLIBC_TUNABLES"] = ":".join(
        t for t in (user_tunables, f"{_HUGE_PAGES_TUNABLE}=1") if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def configure() -> dict:
    """Applies the CPU settings once per process; returns what it did."""
    global _configured
    done = {"malloc": False, "huge_pages": False, "xla_flags": []}
    if _configured or os.environ.get("VI_SIMSIAM_CPU_SETUP", "1") == "0":
        return done
    _configured = True
    if os.environ.get("VI_SIMSIAM_MALLOC", "1") != "0":
        done["huge_pages"] = huge_pages_for_malloc()
        done["malloc"] = tune_malloc()
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    added = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in names]
    if added:
        os.environ["XLA_FLAGS"] = " ".join(flags + added)
    done["xla_flags"] = added
    return done
