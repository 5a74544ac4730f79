"""The float32 peak that benchmarks.train_step divides by (benchmarks/peak_flops.py)."""
import sys

import pytest

from benchmarks import peak_flops

# A 2-CPU Zen 3 VM: AVX2 + FMA, no AVX-512, 4.9 GHz, one core with two SMT threads.
ZEN3_SMT_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 33
cpu MHz\t\t: 4900.000
siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse sse2 avx fma avx2 bmi2

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 avx512f
"""


def test_avx2_fma():
    # 8 lanes x 2 (FMA) x 2 units = 32 flops per cycle per core.
    assert peak_flops.float32_peak({"avx2", "fma"}, cores=1, ghz=4.9).gflops == pytest.approx(156.8)
    peak = peak_flops.float32_peak(["sse", "avx", "avx2", "fma"], cores=2, ghz=4.9)
    assert peak.gflops == pytest.approx(313.6)
    assert peak.source.startswith("cpuinfo: 2 cores x 8 fp32 lanes x 2 (FMA) x 2 units")


def test_avx512():
    peak = peak_flops.float32_peak({"avx2", "fma", "avx512f"}, cores=2, ghz=2.6,
                                   vendor="GenuineIntel", family=6, clock_source="cpu MHz")
    assert peak.gflops == pytest.approx(332.8)
    assert peak.source == ("cpuinfo: 2 cores x 16 fp32 lanes x 2 (FMA) x 2 units (assumed) x "
                           "2.6 GHz (cpu MHz)")
    # Zen 4 runs AVX-512 on 256-bit units.
    zen4 = peak_flops.float32_peak({"avx2", "fma", "avx512f"}, cores=2, ghz=2.6,
                                   vendor="AuthenticAMD", family=25)
    assert zen4.gflops == pytest.approx(166.4)


def test_without_fma():
    assert peak_flops.float32_peak({"avx"}, cores=1, ghz=3.0).gflops == pytest.approx(48.0)
    assert peak_flops.float32_peak({"sse", "sse2"}, cores=1, ghz=3.0).gflops == pytest.approx(24.0)


def test_from_cpuinfo():
    # The first processor's lines only; two CPUs of one SMT core count as one core.
    peak = peak_flops.peak_from_cpuinfo(ZEN3_SMT_CPUINFO, cpus=2)
    assert peak.gflops == pytest.approx(156.8)
    assert "1 cores x 8 fp32 lanes" in peak.source and "2 threads per core" in peak.source
    # cpufreq's maximum wins over "cpu MHz".
    peak = peak_flops.peak_from_cpuinfo(ZEN3_SMT_CPUINFO, cpus=2, max_freq_khz=2_450_000)
    assert peak.gflops == pytest.approx(78.4) and "cpuinfo_max_freq" in peak.source
    assert peak_flops.peak_from_cpuinfo("processor\t: 0\nflags\t: avx2 fma\n", cpus=2) is None


def test_this_machine():
    assert peak_flops.machine_peak("gpu") is None
    peak = peak_flops.machine_peak("cpu")
    if not sys.platform.startswith("linux"):
        assert peak is None
    else:
        assert peak is None or (peak.gflops > 0 and peak.source.startswith("cpuinfo: "))
