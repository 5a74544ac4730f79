"""Pretrains SimSiam / VI-SimSiam.

    python -m experiments.pretrain --config=experiments/configs/cpu_demo.py --workdir=/tmp/run
    python -m experiments.pretrain --config=experiments/configs/paper.py:imagewoof,simsiam \
        --workdir=runs/woof_simsiam --config.num_epochs=100

Resumes from the newest checkpoint when --workdir already holds a run of the same config. On
SIGTERM (preemption) it saves a checkpoint after the current step and exits with status 143.

Several hosts: start the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or --distributed on TPU pods and SLURM, where JAX finds them).
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vi_simsiam_jax import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, config and logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-host training.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with JAX's auto-detection "
                                 "(TPU pods, SLURM).")
_PEER_TIMEOUT = flags.DEFINE_float(
    "peer_timeout_s", 120.0, "Several processes: seconds without a completed step after which "
    "a process stops, its peer taken for lost (the compilation does not count).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Joins the multi-controller runtime when asked to (CPU hosts talk through gloo)."""
    if _COORDINATOR.value is None and not _DISTRIBUTED.value:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The coordination service would abort a process whose peer stopped beating; the loop stops
    # it first, with a message (its watchdog at --peer_timeout_s, a failed collective at once).
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_seconds=int(_PEER_TIMEOUT.value) + 60)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    initialize_distributed()
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())
    try:
        loop.pretrain(_CONFIG.value, _WORKDIR.value, _PEER_TIMEOUT.value)
    except loop.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(128 + 15)
    except loop.LostPeer as lost:
        logging.error("%s", lost)
        logging.flush()
        sys.stderr.flush()
        os._exit(loop.EXIT_LOST_PEER)  # not through JAX's shutdown barrier: it waits for the peer


if __name__ == "__main__":
    app.run(main)
