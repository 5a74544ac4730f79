"""Restoring checkpoints (damaged bytes are moved aside, anything else moves nothing) and the
workdir lock, with real files and real processes: a lock held by another process, a
filesystem without locks, a second run in the same process, and 2-process runs (gloo) that
act on process 0's decision."""

import errno
import fcntl
import glob
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.pretrain_utils import ENV, REPO, free_port
from vi_simsiam_jax import checkpoints, errors

# "w" is large enough for orbax to store it in a data file of its own (small arrays are inlined).
_STATE = {"params": {"w": np.arange(4096, dtype=np.float32).reshape(64, 64),
                     "b": np.ones(64, np.float32)}, "step": 0}


def _saved(workdir, steps=(2, 4)) -> str:
    """workdir with checkpoints of _STATE at `steps` (each with that step); returns its
    checkpoints folder."""
    manager = checkpoints.manager(str(workdir))
    for step in steps:
        checkpoints.save(manager, step, {**_STATE, "step": step})
    manager.close()
    return str(workdir / "checkpoints")


def _restore(workdir, abstract=None):
    return checkpoints.restore_latest(checkpoints.manager(str(workdir)),
                                      _STATE if abstract is None else abstract,
                                      quarantine_corrupt=True)


@pytest.mark.parametrize("damage", ["truncated data files", "truncated metadata",
                                    "deleted data file"])
def test_damaged_newest_checkpoint_is_quarantined_and_the_older_one_restored(tmp_path, caplog,
                                                                               damage):
    directory = _saved(tmp_path)
    if damage == "truncated data files":  # the array chunks: tensorstore's OUT_OF_RANGE
        for path in glob.glob(f"{directory}/4/default/ocdbt.process_0/d/*"):
            os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "truncated metadata":  # orbax's JSON
        path = f"{directory}/4/default/_METADATA"
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # the OCDBT b-tree: NOT_FOUND
        os.remove(glob.glob(f"{directory}/4/default/d/*")[0])
    state = _restore(tmp_path)
    assert state["step"] == 2
    np.testing.assert_array_equal(state["params"]["w"], _STATE["params"]["w"])
    assert sorted(os.listdir(directory)) == ["2", "corrupt-4"]
    assert "Checkpoint at step 4" in caplog.text and "unreadable" in caplog.text


@pytest.mark.parametrize("change", ["extra leaf", "missing leaf", "other shape"])
def test_a_checkpoint_of_another_structure_is_a_named_error_and_moves_nothing(tmp_path,
                                                                              change):
    """What an upgrade that changes the state does: both good checkpoints stay in place."""
    directory = _saved(tmp_path)
    params = dict(_STATE["params"])
    if change == "extra leaf":
        params["new"] = np.zeros(2, np.float32)
    elif change == "missing leaf":
        del params["b"]
    else:
        params["w"] = np.zeros((64, 65), np.float32)
    with pytest.raises(checkpoints.CheckpointMismatch) as raised:
        _restore(tmp_path, {**_STATE, "params": params})
    assert isinstance(raised.value, errors.UserError)
    message = str(raised.value)
    assert f"{directory}/4 was written by a different model, config or code version" in message
    assert "Nothing was moved" in message
    assert {"extra leaf": "params/new", "missing leaf": "params/b",
            "other shape": "params/w: saved (64, 64), expected (64, 65)"}[change] in message
    assert sorted(os.listdir(directory)) == ["2", "4"]


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, os.strerror(errno.EIO)),
    OSError(errno.ESTALE, os.strerror(errno.ESTALE)),
    # tensorstore's form of an I/O error (its FAILED_PRECONDITION, tagged with the OS error)
    ValueError('FAILED_PRECONDITION: Error reading "params.w/0.0" in OCDBT database at local '
               'file "/x/checkpoints/4/default/": [OS error: Input/output error]'),
    MemoryError(),
], ids=["EIO", "ESTALE", "tensorstore EIO", "MemoryError"])
def test_an_io_error_while_restoring_is_raised_and_moves_nothing(tmp_path, monkeypatch, error):
    directory = _saved(tmp_path)

    def failing_restore(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", failing_restore)
    with pytest.raises(type(error)) as raised:
        _restore(tmp_path)
    assert raised.value is error
    assert sorted(os.listdir(directory)) == ["2", "4"]


def test_a_filesystem_without_locks_is_its_own_error(tmp_path, monkeypatch):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(checkpoints.LockingUnsupported) as raised, \
            checkpoints.workdir_lock(str(tmp_path)):
        pass
    assert not isinstance(raised.value, checkpoints.WorkdirInUse)
    assert raised.value.setting == "lock_workdir"
    assert "no POSIX locks (No locks available" in str(raised.value)
    assert "--nolock_workdir" in str(raised.value)
    with checkpoints.workdir_lock(str(tmp_path), enabled=False):  # at the user's risk
        pass


# Holds the lock of the workdir argv[1] until its stdin closes, then releases it normally.
_HOLDER = """
import sys
from vi_simsiam_jax import checkpoints
with checkpoints.workdir_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _hold(workdir) -> subprocess.Popen:
    """A process that holds workdir's lock (workdir_lock) until its stdin is closed."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO, env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def _locked_elsewhere(workdir) -> bool:
    """Whether a process other than this one holds workdir's lock (lockf from a child)."""
    probe = "import fcntl, os, sys; fcntl.lockf(os.open(sys.argv[1], os.O_RDWR), " \
            "fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return subprocess.run([sys.executable, "-c", probe, str(workdir / checkpoints.LOCK_FILE)],
                          capture_output=True, check=False).returncode != 0


def test_in_use_names_the_live_holder_and_a_released_lock_names_no_one(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(checkpoints.WorkdirInUse) as raised, \
                checkpoints.workdir_lock(str(tmp_path)):
            pass
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    message = str(raised.value)
    assert f"is in use by another run (process {holder.pid} on " in message
    assert f"`kill {holder.pid}` on " in message  # how to clear a lock whose holder hangs
    assert "" == (tmp_path / checkpoints.LOCK_FILE).read_text()  # released: names no one
    with checkpoints.workdir_lock(str(tmp_path)):
        assert f"process {os.getpid()} " in (tmp_path / checkpoints.LOCK_FILE).read_text()


def test_a_second_run_in_the_same_process_refuses_and_keeps_the_first_ones_lock(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "work")
    with checkpoints.workdir_lock(str(tmp_path / "work")):
        for path in ("work", "alias"):
            with pytest.raises(checkpoints.WorkdirInUse,
                               match=f"process {os.getpid()} .*this Python process"), \
                    checkpoints.workdir_lock(str(tmp_path / path)):
                pass
        assert _locked_elsewhere(tmp_path / "work")  # the refusals did not release it
    assert not _locked_elsewhere(tmp_path / "work")
    with checkpoints.workdir_lock(str(tmp_path / "work")):  # free again in this process
        pass


# One process of a 2-process run (gloo): argv = mode, port, process id, workdir. "lock": enters
# workdir_lock; "restore": restore_latest of _STATE's structure, process 1 seeing only the
# oldest step (a directory listing that lags, as NFS's attribute cache does).
_PROCESS = """
import sys, time
import jax
mode, port, process_id, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
import numpy as np
from vi_simsiam_jax import checkpoints
if mode == "lock":
    start = time.monotonic()
    try:
        with checkpoints.workdir_lock(workdir):
            print("locked", flush=True)
    except checkpoints.WorkdirInUse as error:
        print(f"refused after {time.monotonic() - start:.1f} s: {error}", flush=True)
else:
    manager = checkpoints.manager(workdir)
    if process_id == 1:
        manager.all_steps = lambda: [2]
    state = {"params": {"w": np.zeros((64, 64), np.float32), "b": np.zeros(64, np.float32)},
             "step": 0}
    restored = checkpoints.restore_latest(manager, state, quarantine_corrupt=True)
    print(f"restored step {restored['step']}", flush=True)
"""


def _two_processes(mode: str, workdir) -> list[str]:
    """_PROCESS as 2 processes x 1 CPU device; the last line each printed."""
    port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-c", _PROCESS, mode, str(port), str(i), str(workdir)], cwd=REPO,
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout.strip().splitlines()[-1] for stdout, _ in outputs]


def test_every_process_of_a_second_multiprocess_run_refuses_at_once(tmp_path):
    holder = _hold(tmp_path)
    try:
        lines = _two_processes("lock", tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert all(line.startswith("refused after ") for line in lines), lines
    assert all(float(line.split()[2]) < 30 for line in lines), lines  # not orbax's 300 s
    messages = [line.split(": ", 1)[1] for line in lines]
    assert messages[0] == messages[1]
    assert f"(process {holder.pid} on " in messages[0]


def test_every_process_restores_the_step_that_process_0_chose(tmp_path):
    """Steps 2, 4, 6 with 6 damaged; process 1's listing shows only step 2. Process 0 moves 6
    aside and chooses 4, and both restore 4."""
    directory = _saved(tmp_path, (2, 4, 6))
    for path in glob.glob(f"{directory}/6/default/ocdbt.process_0/d/*"):
        os.truncate(path, os.path.getsize(path) // 2)
    assert _two_processes("restore", tmp_path) == ["restored step 4"] * 2
    assert sorted(os.listdir(directory)) == ["2", "4", "corrupt-6"]

