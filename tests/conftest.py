"""Test set-up: 8 fake CPU devices (for data-parallel tests) and float32 defaults."""
import os
import tempfile

from tests.xla_flags import with_flags

# Must be set before JAX starts its backend; the user's XLA_FLAGS (`make test-portable`) stay.
# The suite's programs are small and run a few steps, so compiling them is most of its time, and
# XLA's backend (LLVM) optimisation most of that: at level 0 the same HLO compiles about twice
# as fast (benchmarks/README.md, "Test suite time"). A level in the user's XLA_FLAGS is kept.
_OPTIMISATION = "--xla_backend_optimization_level"
os.environ["XLA_FLAGS"] = with_flags(
    "--xla_force_host_platform_device_count=8",
    *([] if _OPTIMISATION in os.environ.get("XLA_FLAGS", "") else [f"{_OPTIMISATION}=0"]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the test process and the training subprocesses it starts, which
# compile the same small programs again: every program is kept, not only those that took 1 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vi_simsiam_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import jax  # noqa: E402  (after the environment set-up above)
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """JAX's 64-bit types for the test (the float64 comparisons of tests/float64.py)."""
    with jax.enable_x64(True):
        yield


def pytest_report_header() -> str:
    return f"XLA_FLAGS: {os.environ['XLA_FLAGS']}"


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    """A prepared 4-class folder dataset (32 train images): (folder, tfds data_dir)."""
    from tests import fake_archives
    from vi_simsiam_jax import datasets

    root = tmp_path_factory.mktemp("pretrain_data")
    folder = root / "images"
    fake_archives.make_folder(folder, ["a", "b", "c", "d"], n_train=8, n_val=2, size=24,
                              extras=False)
    datasets.prepare(str(folder), data_dir=str(root / "tfds"))
    return str(folder), str(root / "tfds")
