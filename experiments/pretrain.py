"""Pretrains SimSiam / VI-SimSiam.

    python -m experiments.pretrain --config=experiments/configs/cpu_demo.py --workdir=/tmp/run
    python -m experiments.pretrain --config=experiments/configs/paper.py:imagewoof,simsiam \
        --workdir=runs/woof_simsiam --config.num_epochs=100

Resumes from the newest checkpoint when --workdir already holds a run of the same config. On
SIGTERM (preemption) it saves a checkpoint after the current step and exits with status 143;
a process whose peer was lost or failed exits with status 75 (relaunch all to resume). A
mistake in a flag, the config or a path is one paragraph naming it, and status 1.

Several hosts: start the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or --distributed on TPU pods and SLURM, where JAX finds them).
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vi_simsiam_jax import errors, loop, run_config, run_control

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
    "peer_timeout_s", 120.0, "Several processes: seconds without a completed step (the "
    "compilation, saves and evaluations do not count), or without a sign of life from a "
    "peer's watchdog, after which a process stops, its peer taken for lost.")
_LOCK_WORKDIR = flags.DEFINE_bool(
    "lock_workdir", True, "Hold a lock on --workdir while training, so that no second run "
    "writes there. --nolock_workdir: for filesystems without locking, at your own risk.")
_ALLOW_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "Config fields that may differ from the workdir's when resuming "
    f"(any of {', '.join(run_config.CHANGEABLE_FIELDS)}), e.g. a lower learning_rate "
    "after a non-finite step; recorded in the workdir's config history.")
flags.mark_flags_as_required(["config", "workdir"])


def _as_typed(error: errors.UserError) -> str:
    """The error as one paragraph that names its setting as typed on the command line, or as
    the config file set it."""
    setting = error.setting or ""
    for i, arg in enumerate(sys.argv):
        if arg == f"--{setting}" and i + 1 < len(sys.argv):
            return f"{arg} {sys.argv[i + 1]}: {error}"
        if arg.startswith(f"--{setting}="):
            return f"{arg}: {error}"
    if setting.startswith("config."):
        config_file = next((a for a in sys.argv if a.startswith("--config=")), "--config")
        return f"{setting} (as set by {config_file}): {error}"
    return str(error)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run_control.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value, _DISTRIBUTED.value, _PEER_TIMEOUT.value)
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())
    try:
        loop.pretrain(_CONFIG.value, _WORKDIR.value, _PEER_TIMEOUT.value,
                      lock_workdir=_LOCK_WORKDIR.value, allow_changes=_ALLOW_CHANGE.value)
    except errors.UserError as error:  # as absl reports a bad flag: no traceback, status 1
        sys.stderr.write(f"FATAL: {_as_typed(error)}\n")
        sys.exit(1)
    except run_control.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(run_control.EXIT_PREEMPTED)
    except run_control.LostPeer as lost:
        logging.error("%s", lost)
        run_control.exit_now(run_control.EXIT_LOST_PEER)
    except Exception:
        if jax.process_count() == 1:
            raise
        logging.exception("Process %d failed; its peers were told.", jax.process_index())
        run_control.exit_now(1)


if __name__ == "__main__":
    app.run(main)
