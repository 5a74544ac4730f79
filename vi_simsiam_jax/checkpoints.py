"""Orbax checkpoints of the train state, and the lock that keeps one run per workdir.

Layout of a workdir: `config.json` and `config_history.jsonl` (`run_config`),
`checkpoints/<step>/` (orbax, the last `keep_checkpoints` kept), `metrics.jsonl` and TensorBoard
event files (`metric_writer`), and `run.lock` (naming the run that holds it). A workdir alone is
enough to restore the encoder for probing.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_manager as ocp_manager

from vi_simsiam_jax import errors

LOCK_FILE = "run.lock"


class WorkdirInUse(errors.UserError):
    """Another live run holds the workdir."""


class LockingUnsupported(errors.UserError):
    """The workdir's filesystem has no POSIX locks (NFS without its lock daemon, some FUSE
    filesystems), so the one-run-per-workdir rule cannot be enforced."""


class CheckpointMismatch(errors.UserError):
    """A checkpoint's tree of arrays differs from the state the code expects (another model,
    config or code version wrote it); raised before anything is moved."""


# lockf's errors when the filesystem cannot lock at all (Linux: ENOTSUP is EOPNOTSUPP).
_NO_LOCKING = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP,
                         errno.EINVAL})
# The lock file's text while a run holds it (`_holder_line`): who to name, or to kill.
_HOLDER = re.compile(r"process (?P<pid>\d+) on (?P<host>\S+), started (?P<started>\S+)")
# realpath -> holder line of the workdirs this process holds: POSIX locks belong to a process,
# so lockf would grant this process a workdir it already holds (and a second descriptor's
# close would release the first run's lock).
_HELD: dict[str, str] = {}
# What process 0 sends to the others (`_decided_by_process_0`): an error message cut to
# _MESSAGE_CHARS, in JSON (at most 6 bytes a character) padded to _MESSAGE_BYTES.
_MESSAGE_CHARS, _MESSAGE_BYTES = 2000, 16384


def _holder_line() -> str:
    return (f"process {os.getpid()} on {socket.gethostname()}, started "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}")


def _in_use(workdir: str, holder: str) -> WorkdirInUse:
    """Names the live holder and how to end it if it hangs."""
    match = _HOLDER.fullmatch(holder)
    if not holder:
        holder = "a run that is starting up"
    elif match and int(match["pid"]) == os.getpid() and match["host"] == socket.gethostname():
        holder += ": this Python process, whose earlier run on it has not returned"
    hint = (f" If that process hangs, end it (`kill {match['pid']}` on {match['host']}): its "
            "lock ends with it." if match else "")
    return WorkdirInUse(
        f"{workdir} is in use by another run ({holder}): one run per workdir. Wait for it to "
        f"end, stop it, or pass another --workdir.{hint} Do not delete {LOCK_FILE}: a run "
        "that starts then would not see the live one.", "workdir")


def _lock(workdir: str) -> tuple[int, str]:
    """Takes workdir's lock for this process and writes the holder line: (descriptor, key)."""
    key = os.path.realpath(workdir)
    if key in _HELD:
        raise _in_use(workdir, _HELD[key])
    path = os.path.join(workdir, LOCK_FILE)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(descriptor, 1024, 0).decode(errors="replace").strip()
        os.close(descriptor)
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise _in_use(workdir, holder) from None
        if error.errno in _NO_LOCKING:
            raise LockingUnsupported(
                f"Cannot lock {path}: its filesystem has no POSIX locks ({error.strerror}; "
                "e.g. NFS without its lock daemon), so nothing would stop a second run from "
                f"writing to {workdir} at the same time. Use a workdir on a filesystem with "
                "locks, or pass --nolock_workdir to run without the lock at your own risk "
                "(then start only one run on this workdir).", "lock_workdir") from error
        raise OSError(error.errno, f"Could not lock {path}: {error.strerror}") from error
    holder = _holder_line()
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{holder}\n".encode(), 0)
    except OSError:
        os.close(descriptor)
        raise
    _HELD[key] = holder
    return descriptor, key


def _unlock(descriptor: int, key: str) -> None:
    """Clears the holder line, so that no later message names a finished run, and releases."""
    del _HELD[key]
    try:
        os.ftruncate(descriptor, 0)
    finally:
        os.close(descriptor)


def _decided_by_process_0(decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs `decide` on process 0 alone and returns its JSON-able result on every process, so
    that all act on one decision. An exception of process 0 is raised on every process (its own
    class for this module's errors, else RuntimeError quoting it) within the time of one
    broadcast, instead of the others waiting for a process 0 that has given up."""
    if jax.process_count() == 1:
        return decide()
    message: dict[str, Any]
    failure = None
    if jax.process_index() == 0:
        try:
            message = {"result": decide()}
        except Exception as error:  # noqa: BLE001  (re-raised below, and sent to the others)
            failure = error
            message = {"error": type(error).__name__, "setting": getattr(error, "setting", None),
                       "message": "\n".join([str(error), *getattr(error, "__notes__", [])]
                                             )[:_MESSAGE_CHARS]}
        encoded = json.dumps(message).encode()
        buffer = np.frombuffer(encoded.ljust(_MESSAGE_BYTES, b"\0"), np.uint8)
    else:
        buffer = np.zeros(_MESSAGE_BYTES, np.uint8)
    received = multihost_utils.broadcast_one_to_all(buffer)
    if failure is not None:
        raise failure
    message = json.loads(np.asarray(received, np.uint8).tobytes().rstrip(b"\0"))
    if "error" in message:
        known = {cls.__name__: cls for cls in (WorkdirInUse, LockingUnsupported,
                                               CheckpointMismatch)}
        if message["error"] in known:
            raise known[message["error"]](message["message"], message["setting"])
        raise RuntimeError(f"Process 0 failed ({message['error']}): {message['message']}")
    return message["result"]


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """One run per workdir: process 0 holds an exclusive POSIX lock on workdir/run.lock while
    the block runs, with a line naming it (pid, host, start time) in the file, cleared when the
    block ends; the other processes of a multi-process run learn process 0's outcome, so every
    process starts or every process raises the same error. The kernel (or NFS's lock manager)
    drops the lock when its process ends, however it ends: a killed run never blocks the next.

    Raises WorkdirInUse naming the live holder (also for a second run in this same process),
    LockingUnsupported where the filesystem cannot lock (enabled=False, the
    `--nolock_workdir` of experiments.pretrain, runs without the lock at the user's risk), and
    OSError naming run.lock for any other failure to lock it.
    """
    if not enabled:
        if jax.process_index() == 0:
            logging.warning("Running without the lock of %s (--nolock_workdir): nothing stops "
                            "a second run from writing to it.", workdir)
        yield
        return
    held: tuple[int, str] | None = None

    def lock() -> dict[str, Any]:
        nonlocal held
        held = _lock(workdir)
        return {}

    try:
        _decided_by_process_0(lock)
        yield
    finally:
        if held is not None:
            _unlock(*held)


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


# tensorstore's statuses for a file shorter than its index says, undecodable, or missing.
_DAMAGED_STATUS = re.compile(r"(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND): ")
# Its FAILED_PRECONDITION for a compressed chunk that does not decode; it also reports most I/O
# errors (EIO, ESTALE) as FAILED_PRECONDITION, tagged "[OS error: ...]", and those are not damage.
_UNDECODABLE = re.compile(r"FAILED_PRECONDITION: .*(ZSTD_decompressStream\(\) failed|"
                          r"Truncated Zstd-compressed stream)")


def _is_damaged(error: Exception, checkpoint_dir: str) -> bool:
    """Whether `error`, raised while reading checkpoint_dir, says that its bytes are damaged:
    a truncated, corrupted or missing file as orbax and tensorstore report them. Anything else
    (an I/O error, a structure mismatch, memory) is not, and moves nothing."""
    if isinstance(error, FileNotFoundError):  # orbax's own, for a file missing inside it
        return os.path.isdir(checkpoint_dir)
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):  # its metadata files
        return True
    message = str(error)
    return type(error) is ValueError and (
        _DAMAGED_STATUS.match(message) is not None
        or (_UNDECODABLE.match(message) is not None and "[OS error" not in message))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params/backbone/...": shape} of a state, an abstract state or orbax's tree metadata."""
    return {"/".join(path): tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
            for path, leaf in ocp.tree.to_flat_dict(tree).items()}


def _check_structure(saved_tree: Any, abstract_state: Any, partial: bool,
                     checkpoint_dir: str) -> None:
    """Raises CheckpointMismatch unless the checkpoint holds abstract_state's arrays with their
    shapes, and (unless partial) no others. Orbax alone would restore a leaf of another shape
    at its saved shape, and fails on an extra leaf with an unrelated error."""
    saved, wanted = _shapes(saved_tree), _shapes(abstract_state)
    problems = [f"{what}: {len(names)} (e.g. {', '.join(names[:3])})" for what, names in (
        ("arrays missing from it", sorted(wanted.keys() - saved.keys())),
        ("arrays that this code does not have", [] if partial else
         sorted(saved.keys() - wanted.keys())),
        ("arrays of other shapes", [f"{k}: saved {saved[k]}, expected {wanted[k]}"
                                    for k in sorted(saved.keys() & wanted.keys())
                                    if saved[k] != wanted[k]])) if names]
    if problems:
        raise CheckpointMismatch(
            f"The checkpoint {checkpoint_dir} was written by a different model, config or code "
            f"version than this run's: {'; '.join(problems)}. Nothing was moved. Resume it with "
            "the code and config that wrote it, or start this run in another --workdir.",
            "workdir")


def _read(directory: str, step: int, abstract_state: Any, partial: bool) -> Any:
    """Checkpoint `step` read by this process alone: no barrier for the other processes of a
    multi-process run to meet, so that process 0 can try steps by itself."""
    path = epath.Path(directory) / str(step) / ocp_manager.DEFAULT_ITEM_NAME
    _check_structure(ocp.StandardCheckpointHandler().metadata(path).tree, abstract_state,
                     partial, os.path.join(directory, str(step)))
    if partial:
        handler = ocp.PyTreeCheckpointHandler()
        args = ocp.args.PyTreeRestore(
            item=abstract_state, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    else:
        handler, args = ocp.StandardCheckpointHandler(), ocp.args.StandardRestore(abstract_state)
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    checkpointer = ocp.Checkpointer(handler, multiprocessing_options=alone)
    try:
        return checkpointer.restore(path, args=args)
    finally:
        checkpointer.close()


def restore_latest(checkpoint_manager: ocp.CheckpointManager, abstract_state: Any,
                   step: int | None = None, quarantine_corrupt: bool = False,
                   partial: bool = False) -> Any | None:
    """Restores the given step, or the newest readable one; None if there are none.

    partial: abstract_state is a dict holding some of the saved state's fields (e.g. the
    encoder's "params" and "batch_stats"); only those are read (orbax partial restore).

    A checkpoint whose bytes are damaged (truncated, corrupted or missing files: `_is_damaged`)
    is reported and the next older one is tried, so one bad save never loses the run. With
    quarantine_corrupt (a run that will save again) it is moved aside to
    `checkpoints/corrupt-<step>`, kept for inspection, so the resumed run can write that step
    anew. Anything else moves nothing and is raised: CheckpointMismatch for a checkpoint of
    another model, config or code version; an I/O error as it is. With several processes,
    process 0 alone tries and moves checkpoints and every process restores the step it chose.
    """
    directory = os.fspath(checkpoint_manager.directory)
    if step is not None:
        if step not in checkpoint_manager.all_steps():
            raise ValueError(f"No checkpoint for step {step} in {directory}; available: "
                             f"{sorted(checkpoint_manager.all_steps())}.")
        return _read(directory, step, abstract_state, partial)
    restored = None

    def choose() -> dict[str, Any]:
        nonlocal restored
        steps = sorted(checkpoint_manager.all_steps(), reverse=True)
        moved = []
        for candidate in steps:
            checkpoint_dir = os.path.join(directory, str(candidate))
            try:
                restored = _read(directory, candidate, abstract_state, partial)
                return {"step": candidate, "moved": moved}
            except Exception as error:
                if not _is_damaged(error, checkpoint_dir):
                    if not isinstance(error, CheckpointMismatch):
                        error.add_note(f"While reading the checkpoint {checkpoint_dir}: not a "
                                       "sign of damaged files, so nothing was moved.")
                    raise
                cause = str(error).split(" [tensorstore_spec")[0]
                logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an "
                                "older one.", candidate, directory, type(error).__name__, cause)
                if quarantine_corrupt:
                    os.rename(checkpoint_dir, os.path.join(directory, f"corrupt-{candidate}"))
                    moved.append(candidate)
        if steps:
            raise RuntimeError(f"No readable checkpoint in {directory} (tried steps {steps}"
                               f"{'; all moved to corrupt-<step>' if moved else ''}).")
        return {"step": None, "moved": moved}

    chosen = _decided_by_process_0(choose)
    if chosen["moved"]:
        checkpoint_manager.reload()
    if chosen["step"] is not None and jax.process_index() != 0:
        restored = _read(directory, chosen["step"], abstract_state, partial)
    return restored
