"""The float32 peak of the CPU a benchmark runs on, for its achieved fraction of peak.

    peak = peak_flops.machine_peak(jax.default_backend())  # None off Linux or off the CPU
    peak.gflops, peak.source

peak = cores x fp32 lanes per vector op x 2 if the op is a fused multiply-add x vector FMA units
per core x clock. `float32_peak` computes it from facts about the CPU (its /proc/cpuinfo flags,
cores, GHz), `peak_from_cpuinfo` gets those facts from the text of /proc/cpuinfo, and
`machine_peak` reads that text (and the clock) from the machine:

- cores: the CPUs this process may run on (`os.sched_getaffinity`, else `os.cpu_count`), which
  is how many threads XLA:CPU uses, divided by the threads per core of SMT (/proc/cpuinfo's
  "siblings" / "cpu cores"): hyperthreads of one core share its vector units.
- lanes: 16 with AVX-512 (avx512f), 8 with AVX or AVX2, else 4 (SSE; also Arm's 128-bit NEON).
  AMD's Zen 4 (family 25 with avx512f) runs a 512-bit op as two halves on 256-bit units, so it
  counts 8 lanes.
- FMA: x2 where the CPU has it (fma or avx512f; asimd on Arm).
- units: 2 vector FMA units per core. This is an assumption, not read from the machine: it holds
  for x86 desktop and server cores with AVX2 or AVX-512 (Intel since Haswell, AMD since Zen 2;
  before FMA, the 2 are a multiply and an add unit), but some parts have one 512-bit FMA unit
  (e.g. Xeon Bronze and Silver). The benchmarks' --peak_gflops overrides the whole computation.
- clock: /sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq where the kernel exposes it (the
  highest boost clock: an upper bound, since cores under a vector load often run below it),
  else the "cpu MHz" line of /proc/cpuinfo (in a VM, usually the nominal clock).
"""

import dataclasses
import os
import sys

CPUINFO = "/proc/cpuinfo"
MAX_FREQ = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"  # kHz
FMA_UNITS_PER_CORE = 2  # assumed; see the module docstring


@dataclasses.dataclass(frozen=True)
class Peak:
    gflops: float
    source: str


def float32_peak(flags, cores: int, ghz: float, *, vendor: str = "", family: int = 0,
                 clock_source: str = "") -> Peak:
    """The float32 peak of `cores` cores at `ghz` with the /proc/cpuinfo `flags` (any iterable
    of flag names); `vendor` and `family` are /proc/cpuinfo's vendor_id and cpu family."""
    flags = set(flags)
    if "avx512f" in flags:
        lanes = 8 if (vendor == "AuthenticAMD" and family == 25) else 16
    elif flags & {"avx", "avx2"}:
        lanes = 8
    else:
        lanes = 4
    fma = 2 if flags & {"fma", "avx512f", "asimd"} else 1
    gflops = cores * lanes * fma * FMA_UNITS_PER_CORE * ghz
    clock = f"{ghz:g} GHz" + (f" ({clock_source})" if clock_source else "")
    fma_text = f" x {fma} (FMA)" if fma == 2 else ""
    source = (f"cpuinfo: {cores} cores x {lanes} fp32 lanes{fma_text} x {FMA_UNITS_PER_CORE} "
              f"units (assumed) x {clock}")
    return Peak(round(gflops, 1), source)


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's "key: value" lines of /proc/cpuinfo."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def peak_from_cpuinfo(cpuinfo: str, cpus: int, max_freq_khz: int | None = None) -> Peak | None:
    """`float32_peak` from the text of /proc/cpuinfo, the CPUs this process may use and, where
    known, cpufreq's cpuinfo_max_freq (kHz); None if the clock or the flags are missing."""
    info = _cpuinfo_fields(cpuinfo)
    flags = (info.get("flags") or info.get("Features") or "").split()
    if max_freq_khz:
        ghz, clock_source = max_freq_khz / 1e6, "cpuinfo_max_freq"
    else:
        try:
            ghz, clock_source = float(info["cpu MHz"]) / 1e3, "cpu MHz"
        except (KeyError, ValueError):
            return None
    if not flags or ghz <= 0:
        return None
    try:
        threads_per_core = max(1, int(info["siblings"]) // int(info["cpu cores"]))
    except (KeyError, ValueError, ZeroDivisionError):
        threads_per_core = 1
    cores = max(1, cpus // threads_per_core)
    try:
        family = int(info.get("cpu family", "0"))
    except ValueError:
        family = 0
    peak = float32_peak(flags, cores, round(ghz, 3), vendor=info.get("vendor_id", ""),
                        family=family, clock_source=clock_source)
    if threads_per_core > 1:
        peak = Peak(peak.gflops,
                    f"{peak.source}; {cpus} CPUs at {threads_per_core} threads per core")
    return peak


def machine_peak(backend: str = "cpu") -> Peak | None:
    """`peak_from_cpuinfo` of this machine (Linux's /proc and /sys); None off Linux, on an
    accelerator backend, or where the facts cannot be read."""
    if backend != "cpu" or not sys.platform.startswith("linux"):
        return None
    try:
        with open(CPUINFO) as f:
            cpuinfo = f.read()
    except OSError:
        return None
    try:
        with open(MAX_FREQ) as f:
            max_freq_khz = int(f.read())
    except (OSError, ValueError):
        max_freq_khz = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return peak_from_cpuinfo(cpuinfo, cpus or 1, max_freq_khz)
