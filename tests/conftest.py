"""Test set-up: 8 fake CPU devices (for data-parallel tests) and float32 defaults."""
import os
import tempfile

# Must be set before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the test process and the training subprocesses it starts.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vi_simsiam_jax_test_cache"))
