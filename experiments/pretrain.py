"""Pretrains SimSiam / VI-SimSiam.

    python -m experiments.pretrain --config=experiments/configs/cpu_demo.py --workdir=/tmp/run
    python -m experiments.pretrain --config=experiments/configs/paper.py:imagewoof,simsiam \
        --workdir=runs/woof_simsiam --config.num_epochs=100

Resumes from the newest checkpoint when --workdir already holds a run of the same config.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vi_simsiam_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, config and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Orbax logs every save step at INFO; keep its warnings only.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= logging.WARNING or "orbax" not in record.pathname)
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
