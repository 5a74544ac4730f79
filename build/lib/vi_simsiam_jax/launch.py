"""Process set-up shared by every entry point (`python -m experiments.*`, `benchmarks.*`).

    from vi_simsiam_jax import launch

    launch.configure(__name__)  # first: before jax and tensorflow are imported
    ...                         # the module's imports and main
    if __name__ == "__main__":
        app.run(main)

For the program being run (module name "__main__"; an import, as in the tests, changes
nothing):
- when JAX will run on the CPU (`cpu.process.cpu_backend_expected`: no accelerator backend
  installed, or JAX_PLATFORMS=cpu), the XLA:CPU process settings of `cpu.process` (they may
  restart the process once, which is why this comes before the heavy imports), and
  JAX_PLATFORMS=cpu unless set, so JAX does not probe for a TPU;
- TensorFlow's C++ log silenced unless TF_CPP_MIN_LOG_LEVEL is set (TensorFlow only feeds the
  input pipeline, whose errors arrive as Python exceptions; on machines without CUDA it logs a
  failed cuInit). Set here, before jax is imported: jax sets it to 1 otherwise;
- orbax's per-save INFO lines dropped.
"""

import logging as py_logging
import os
from typing import Any

from vi_simsiam_jax.cpu import process


def _not_orbax_info(record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def configure(module_name: str) -> dict[str, Any]:
    """Sets the process up if `module_name` is "__main__"; returns the CPU settings applied."""
    if module_name != "__main__":
        return {}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    done = {}
    if process.cpu_backend_expected():
        done = process.configure()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import logging  # noqa: PLC0415  (light; after the possible restart)
    logging.get_absl_handler().addFilter(_not_orbax_info)
    return done
