"""Orbax checkpoints of the train state, with the run's config saved beside them.

Layout of a workdir: `config.json` (the pretraining config), `checkpoints/<step>/` (orbax, the
last `keep_checkpoints` kept), `metrics.jsonl` and TensorBoard event files, and `run.lock`
(held by the run in progress). A workdir alone is enough to restore the encoder for probing.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"
# Settings that may change when a run is resumed (loop settings, the kNN monitor, and the
# convolution implementation, which leaves parameters and values unchanged); every other field
# must match.
_RESUMABLE_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "conv",
                     "eval_every_epochs")


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json, or checks that a resumed run uses the config it started with."""
    path = os.path.join(workdir, CONFIG_FILE)
    new = _config_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in old.keys() | new.keys()
                         if k not in _RESUMABLE_FIELDS and old.get(k) != new.get(k))
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {changed}); resume it "
                "with the same config or start the new run in another --workdir.")
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(new, f, indent=2)
        os.replace(tmp, path)


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """One run per workdir: process 0 holds an exclusive POSIX lock on workdir/run.lock while the
    block runs (the other processes of a multi-host run share process 0's). The kernel (or the
    NFS lock manager) drops the lock when its process ends, however it ends, so the lock of a
    killed run never blocks the next one. Raises WorkdirInUse naming the holder."""
    if jax.process_index() != 0:
        yield
        return
    descriptor = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(descriptor, 1024, 0).decode(errors="replace").strip()
        os.close(descriptor)
        raise WorkdirInUse(
            f"{workdir} is in use by another run ({holder or 'a process starting up'}): one run "
            "per workdir. Wait for it to end, stop it, or pass another --workdir.") from None
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (f"process {os.getpid()} on {socket.gethostname()}, started "
                               f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
                               ).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a pretraining workdir was made with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a pretraining workdir (run "
            "`python -m experiments.pretrain --workdir=...` first).")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def manager(workdir: str, config: ml_collections.ConfigDict | None = None,
            read_only: bool = False) -> ocp.CheckpointManager:
    """CheckpointManager for workdir/checkpoints, keeping config.keep_checkpoints."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints if config else None,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save(checkpoint_manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves state (host arrays) as checkpoint `step`; an I/O failure (disk full, permissions)
    raises OSError naming the directory. Orbax writes to a temporary directory and renames it on
    success, so a failed save never touches earlier checkpoints."""
    try:
        checkpoint_manager.save(step, args=ocp.args.StandardSave(state), force=True)
        checkpoint_manager.wait_until_finished()
    except OSError as error:
        raise OSError(f"Could not write the step-{step} checkpoint to "
                      f"{checkpoint_manager.directory}: {error}. Earlier checkpoints are "
                      "untouched.") from error


def restore_latest(checkpoint_manager: ocp.CheckpointManager, abstract_state: Any,
                   step: int | None = None, quarantine_corrupt: bool = False,
                   partial: bool = False) -> Any | None:
    """Restores the given step, or the newest readable one; None if there are none.

    partial: abstract_state is a dict holding some of the saved state's fields (e.g. the
    encoder's "params" and "batch_stats"); only those are read (orbax partial restore).

    A checkpoint that fails to restore (truncated or corrupted files) is reported and the next
    older one is tried, so one bad save never loses the run. With quarantine_corrupt (a run
    that will save again) the bad one is moved aside to `checkpoints/corrupt-<step>`, kept for
    inspection, so the resumed run can write that step anew.
    """
    steps = sorted(checkpoint_manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise ValueError(f"No checkpoint for step {step} in {checkpoint_manager.directory}; "
                             f"available: {sorted(steps)}.")
        steps = [step]
    if partial:
        args = ocp.args.PyTreeRestore(
            item=abstract_state, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    else:
        args = ocp.args.StandardRestore(abstract_state)
    quarantined = False
    for candidate in steps:
        try:
            state = checkpoint_manager.restore(candidate, args=args)
        except Exception as error:  # orbax raises many types for damaged files
            if step is not None:
                raise
            directory = os.fspath(checkpoint_manager.directory)
            logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an "
                            "older one.", candidate, directory, type(error).__name__, error)
            if quarantine_corrupt and jax.process_index() == 0:
                os.rename(os.path.join(directory, str(candidate)),
                          os.path.join(directory, f"corrupt-{candidate}"))
                quarantined = True
            continue
        if quarantined:
            checkpoint_manager.reload()
        return state
    if steps:
        raise RuntimeError(f"No readable checkpoint in {checkpoint_manager.directory} "
                           f"(tried steps {steps}).")
    return None
