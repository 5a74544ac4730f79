"""Scale-out and failure handling with real processes: 2 processes (gloo) against 8 devices,
resume on another device count, a preempted or lost process of two, corrupt checkpoints, I/O
errors, SIGTERM."""

import errno
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.pretrain_utils import ENV, REPO, command, config, free_port, restore
from vi_simsiam_jax import checkpoints, errors, loop, run_control


@pytest.fixture(scope="module")
def finished_run(pretrain_data, tmp_path_factory):
    """A 1-epoch tiny run (4 steps, checkpoints at 2 and 4) made in this process."""
    workdir = tmp_path_factory.mktemp("finished_run")
    loop.pretrain(config(pretrain_data, num_epochs=1), str(workdir))
    return workdir


_FLOAT64 = "--config.model.dtype=float64"
_ONE_DEVICE_FLOAT64 = {**ENV, "JAX_ENABLE_X64": "1"}


# 16 steps: after the first checkpoint, room for a preemption (whose sync point a few steps after
# the SIGTERM the processes agree on through JAX's coordination service) and a later kill.
_EPOCHS = 4


@pytest.fixture(scope="module")
def float64_run(pretrain_data, tmp_path_factory):
    """The tiny run in float64 on this process's 8 devices, _EPOCHS epochs (4 steps each, every
    one of its checkpoints kept: every 2 steps)."""
    workdir = tmp_path_factory.mktemp("float64_run")
    with jax.enable_x64(True):
        one = config(pretrain_data, num_epochs=_EPOCHS, keep_checkpoints=4 * _EPOCHS)
        one.model.dtype = "float64"
        loop.pretrain(one, str(workdir))
    return workdir


def _start_processes(pretrain_data, workdir, logs_dir, num_processes: int,
                     float64: bool = True, *flags: str, fault: dict[str, str] | None = None
                     ) -> tuple[list[subprocess.Popen], list]:
    """The tiny run of `float64_run`'s config (or in float32, compiled at ENV's optimisation
    level) started as num_processes processes x 1 CPU device (gloo), with `flags` added;
    (processes, log files). `fault`: the environment of `tests.faulty_pretrain`, run instead of
    experiments.pretrain."""
    port = free_port()
    cluster = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}"]
    # Each process logs to a file: a pipe that the test does not read while it waits for the
    # other process fills up, and the blocked writer never reaches JAX's shutdown barrier.
    logs = [logs_dir / f"process_{i}.log" for i in range(num_processes)]
    processes = []
    for i, log in enumerate(logs):
        args = command(pretrain_data, workdir, f"--config.num_epochs={_EPOCHS}",
                       f"--config.keep_checkpoints={4 * _EPOCHS}", "--peer_timeout_s=30",
                       *([_FLOAT64] if float64 else []),
                       *(cluster + [f"--process_id={i}"] if num_processes > 1 else []), *flags)
        if fault:
            args[2] = "tests.faulty_pretrain"
        with open(log, "w") as stderr:
            processes.append(subprocess.Popen(
                args, cwd=REPO, env={**(_ONE_DEVICE_FLOAT64 if float64 else ENV), **(fault or {})},
                stdout=subprocess.DEVNULL, stderr=stderr))
    return processes, logs


def _run_processes(pretrain_data, workdir, logs_dir, num_processes: int,
                   float64: bool = True) -> None:
    """`_start_processes`, and each must end with status 0."""
    processes, logs = _start_processes(pretrain_data, workdir, logs_dir, num_processes, float64)
    for process, log in zip(processes, logs):
        process.wait(timeout=600)
        assert process.returncode == 0, log.read_text()[-3000:]
    if num_processes > 1:
        assert f"JAX process 1/{num_processes}" in logs[1].read_text()


def _assert_roundoff_apart(a, b) -> None:
    """Float64 programs that sum in other orders (gloo, 8 devices) differ by roundoff: ~1e3 eps64
    ~ 2e-13 after 2 steps from the same state (as 1e-5 ~ 1e2 eps32 in float32), and 1e-10 keeps
    500x of margin. Training amplifies it, so the comparisons start 2 steps apart."""
    for name in ("params", "batch_stats"):
        assert {x.dtype for x in jax.tree.leaves(getattr(a, name))} == {np.dtype("float64")}
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12),
                     getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_run_checkpointed_on_8_devices_resumes_on_another_device_count(
        pretrain_data, float64_run, tmp_path, num_processes):
    """The 8-device run's checkpoint 2 steps before its end, resumed on 1 process x 1 device or
    2 processes x 1 device (gloo collectives): the same global batches and the same step, so
    its last step equals the 8-device run's to the roundoff of 2 steps (other batches would move
    it far more)."""
    last = 4 * _EPOCHS
    workdir = tmp_path / "resumed"
    shutil.copytree(float64_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(last))
    _run_processes(pretrain_data, workdir, tmp_path, num_processes)
    assert f"Resuming at step {last - 2}" in (tmp_path / "process_0.log").read_text()
    with jax.enable_x64(True):
        resumed, uninterrupted = restore(workdir), restore(float64_run)
    assert int(resumed.step) == int(uninterrupted.step) == last
    _assert_roundoff_apart(resumed, uninterrupted)


def _wait_for(path, processes, seconds: float = 600) -> None:
    """Until `path` exists; every process must still be running."""
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        assert all(p.poll() is None for p in processes), "a process ended too early"
        time.sleep(0.05)
    assert path.exists()


def _kill_process_1(processes: list[subprocess.Popen], logs) -> str:
    """SIGKILL to process 1 of 2: process 0 must stop within 60 s with EXIT_LOST_PEER, not
    abort; its log."""
    processes[1].send_signal(signal.SIGKILL)
    start = time.time()
    assert processes[0].wait(timeout=300) == run_control.EXIT_LOST_PEER, logs[0].read_text()[-3000:]
    assert time.time() - start < 60
    processes[1].wait()
    survivor = logs[0].read_text()
    assert "Fatal Python error" not in survivor
    return survivor


def test_one_slow_preempted_or_lost_process_of_two(pretrain_data, tmp_path):
    """2 processes x 1 device. Uninterrupted, process 1's saves and kNN-monitor evaluations
    take 6 s, --peer_timeout_s 3: the watchdog is off while a process saves, evaluates, or
    waits for its peer to, so both finish. Then SIGTERM to process 1 alone: both agree on a
    step, save it once, exit 143; relaunched, SIGKILL to process 1, process 0 stops at once
    (status EXIT_LOST_PEER, a message saying how to resume, no abort in JAX's shutdown);
    relaunched again, the run ends bit for bit where the uninterrupted run ends (one program,
    float32; evaluations and checkpoints leave the training unchanged)."""
    reference = tmp_path / "uninterrupted"
    processes, logs = _start_processes(
        pretrain_data, reference, tmp_path, 2, False, "--peer_timeout_s=3",
        "--config.eval_every_epochs=2", "--config.checkpoint_every_steps=8",
        fault={"FAULT_PROCESS": "1", "FAULT": "slow:6"})
    statuses = [p.wait(timeout=600) for p in processes]
    assert statuses == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert "knn_top1_local_val" in logs[0].read_text()

    workdir = tmp_path / "run"
    processes, logs = _start_processes(pretrain_data, workdir, tmp_path, 2, float64=False)
    _wait_for(workdir / "checkpoints" / "2" / "commit_success.txt", processes)
    processes[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in processes] == [143, 143]
    stopped = {re.search(r"Preempted \(SIGTERM\) after step (\d+)", log.read_text()).group(1)
               for log in logs}
    assert len(stopped) == 1, stopped  # the same step on both
    preempted_at = int(stopped.pop())
    assert 2 < preempted_at < 4 * _EPOCHS
    assert (workdir / "checkpoints" / str(preempted_at) / "commit_success.txt").exists()

    processes, logs = _start_processes(pretrain_data, workdir, tmp_path, 2, float64=False)
    next_checkpoint = preempted_at + 2 - preempted_at % 2
    _wait_for(workdir / "checkpoints" / str(next_checkpoint) / "commit_success.txt", processes)
    survivor = _kill_process_1(processes, logs)
    assert f"Resuming at step {preempted_at}" in survivor
    assert "another process of the run has most likely died" in survivor
    assert "Relaunch all processes with the same command" in survivor

    _run_processes(pretrain_data, workdir, tmp_path, 2, float64=False)
    final, expected = restore(workdir), restore(reference)
    assert int(final.step) == int(expected.step) == 4 * _EPOCHS
    # One program on the same batches from saved states: the same arithmetic, bit for bit.
    for name in ("params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(final, name),
                     getattr(expected, name))


def test_a_peer_lost_while_a_process_waits_at_a_barrier(pretrain_data, tmp_path):
    """Process 1 dies during its (slow) kNN-monitor evaluation while process 0, done with its
    own, waits at the barrier after it, where no collective fails: process 0 stops once process
    1 gives no sign of life for --peer_timeout_s (EXIT_LOST_PEER, a message), before the
    coordination service notices the missed heartbeats and aborts it."""
    processes, logs = _start_processes(
        pretrain_data, tmp_path / "run", tmp_path, 2, False, "--peer_timeout_s=5",
        "--config.eval_every_epochs=1", "--config.checkpoint_every_steps=8",
        fault={"FAULT_PROCESS": "1", "FAULT": "slow:600"})
    while "Extracted" not in logs[0].read_text():
        assert all(p.poll() is None for p in processes), "a process ended too early"
        time.sleep(0.05)
    time.sleep(1.0)
    survivor = _kill_process_1(processes, logs)
    assert "Process 0 of 2: process 1 gave no sign of life for 5 s" in survivor
    assert "resumes from its start (no checkpoint yet)" in survivor


def test_a_failing_process_reports_its_own_error_and_its_peer_names_it(pretrain_data,
                                                                        tmp_path):
    """Process 1's save of step 4 fails (a full disk): it exits 1 with its own error, and
    process 0 stops at once (EXIT_LOST_PEER) saying which process failed, and with what."""
    processes, logs = _start_processes(pretrain_data, tmp_path / "run", tmp_path, 2, False,
                                       fault={"FAULT_PROCESS": "1", "FAULT": "disk_full:4"})
    statuses = [p.wait(timeout=600) for p in processes]
    assert statuses == [run_control.EXIT_LOST_PEER, 1], [log.read_text()[-2000:] for log in logs]
    failed, peer = logs[1].read_text(), logs[0].read_text()
    assert "Could not write the step-4 checkpoint: No space left on device" in failed
    assert "Process 1 of 2" not in failed  # its own error, not a lost peer's
    assert ("Process 0 of 2: process 1 failed: OSError: [Errno 28] Could not write the step-4 "
            "checkpoint") in peer
    assert "most likely died" not in peer and "Relaunch all processes" in peer


def _corrupt(checkpoint_dir) -> None:
    """Truncates every data file of a checkpoint to half its size."""
    for root, _, files in os.walk(checkpoint_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def test_corrupt_latest_checkpoint_falls_back_to_previous(pretrain_data, finished_run, tmp_path,
                                                          caplog):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    _corrupt(workdir / "checkpoints" / "4")
    state = restore(workdir)  # read-only restore (as the probe does): falls back, says so
    assert int(state.step) == 2
    assert "Checkpoint at step 4" in caplog.text and "unreadable" in caplog.text
    # Training resumes from step 2, keeps the bad files aside and writes step 4 anew.
    final = loop.pretrain(config(pretrain_data, num_epochs=1), str(workdir))
    assert int(final.step) == 4
    assert (workdir / "checkpoints" / "corrupt-4").is_dir()
    # The same program and batches from the same step-2 state: equal bit for bit.
    jax.tree.map(np.testing.assert_array_equal, restore(workdir).params,
                 restore(finished_run).params)


def test_unwritable_workdir_fails_before_training(pretrain_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(errors.UserError, match=f"Workdir {blocker / 'run'} is not writable"):
        loop.pretrain(config(pretrain_data), str(blocker / "run"))


def test_disk_full_at_save_is_clear_and_keeps_earlier_checkpoints(pretrain_data, finished_run,
                                                                   tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    before = restore(workdir)

    def disk_full(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(OSError, match="Could not write the step-4 checkpoint.*No space left"):
        loop.pretrain(config(pretrain_data, num_epochs=1), str(workdir))
    monkeypatch.undo()
    after = restore(workdir)
    assert int(after.step) == 2
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)


@pytest.mark.parametrize("overrides,field", [
    (dict(learning_rate=-0.1), "config.learning_rate"),
    (dict(global_size=224, dataset="imagenette"), "config.global_size"),
    (dict(dataset="cifar10"), "config.dataset"),
    (dict(method="vi_byol"), "config.method"),
    (dict(target="momentum"), "config.target"),
    (dict(local_scale=(0.5, 0.2)), "config.local_scale"),
])
def test_invalid_config_values_name_the_field(pretrain_data, tmp_path, overrides, field):
    with pytest.raises(errors.UserError) as raised:
        loop.pretrain(config(pretrain_data, **overrides), str(tmp_path))
    assert raised.value.setting == field
    assert not os.listdir(tmp_path)  # nothing written


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(pretrain_data, tmp_path):
    flags = ["--config.checkpoint_every_steps=1000"]  # 8 steps, no periodic checkpoint
    run = subprocess.Popen(command(pretrain_data, tmp_path, *flags), cwd=REPO, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        assert run.poll() is None, run.stderr.read()[-3000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 143, stderr[-3000:]
    assert "Preempted (SIGTERM) after step" in stderr
    saved = checkpoints.manager(str(tmp_path), read_only=True).all_steps()
    assert len(saved) == 1 and 2 <= saved[0] < 8  # only the preemption checkpoint
    resumed = subprocess.run(command(pretrain_data, tmp_path, *flags), cwd=REPO, env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming at step {saved[0]} of 8" in resumed.stderr
    assert int(restore(tmp_path).step) == 8


def _wait_for_exit(exits: list[int]) -> None:
    """Up to 10 s, until the watchdog calls os._exit (patched to append to `exits`)."""
    deadline = time.time() + 10
    while not exits and time.time() < deadline:
        time.sleep(0.1)


def test_watchdog_ends_a_multihost_process_whose_step_hangs(monkeypatch, capfd):
    """A peer that hangs (no collective fails): after the timeout without a step the process
    exits with EXIT_LOST_PEER and says why; paused (a local evaluation) it waits."""
    exits = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(os, "_exit", exits.append)
    watchdog = run_control.Watchdog(1.0, lambda cause: f"{cause}: a peer is gone")
    try:
        time.sleep(2.5)
        assert exits == []  # not armed before the first step
        watchdog.beat()
        with watchdog.paused():
            time.sleep(2.5)
            assert exits == []  # paused
        _wait_for_exit(exits)
    finally:
        watchdog.stop()
    assert exits[:1] == [run_control.EXIT_LOST_PEER]
    assert "No progress for 1 s. no step has completed: a peer is gone" in capfd.readouterr().err


class _KeyValueStore:
    """The coordination service's key-value store, as the watchdog uses it."""

    def __init__(self):
        self.values: dict[str, str] = {}

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        assert allow_overwrite or key not in self.values
        self.values[key] = value

    def key_value_dir_get(self, directory: str) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.values.items() if k.startswith(directory)]


def test_watchdog_ends_a_process_whose_peer_gives_no_sign_of_life(monkeypatch, capfd):
    """Process 1's sign of life changes, then stops changing: process 0 exits (EXIT_LOST_PEER)
    after the timeout, paused or not, without waiting for the dead process 1 to say it exits; a
    peer whose watchdog stopped (its run ended) is not lost. Process 0 gives its own sign of
    life meanwhile, and marks it stopped at the end."""
    exits, store = [], _KeyValueStore()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(run_control, "_client", lambda: store)
    monkeypatch.setattr(os, "_exit", exits.append)
    watchdog = run_control.Watchdog(1.0, lambda cause: f"{cause}: a peer is gone")
    try:
        with watchdog.paused():
            store.values["vi_simsiam/alive/1"] = run_control._STOPPED
            time.sleep(2.5)
            assert exits == []
            for sign in range(10):  # alive
                store.values["vi_simsiam/alive/1"] = str(sign)
                time.sleep(0.25)
            last_sign = time.monotonic()
            assert exits == []
            assert store.values["vi_simsiam/alive/0"] != run_control._STOPPED
            _wait_for_exit(exits)
            assert time.monotonic() - last_sign < run_control._REPORT_WAIT_S
    finally:
        watchdog.stop()
    assert exits[:1] == [run_control.EXIT_LOST_PEER]
    assert "process 1 gave no sign of life for 1 s: a peer is gone" in capfd.readouterr().err
    assert store.values["vi_simsiam/alive/0"] == run_control._STOPPED
