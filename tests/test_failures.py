"""Scale-out and failure handling: 2 real processes, corrupt checkpoints, I/O errors, SIGTERM."""

import errno
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.pretrain_utils import ENV, REPO, command, config, restore
from tests.xla_flags import with_flags
from vi_simsiam_jax import checkpoints, loop, train_state


@pytest.fixture(scope="module")
def finished_run(pretrain_data, tmp_path_factory):
    """A 1-epoch tiny run (4 steps, checkpoints at 2 and 4) made in this process."""
    workdir = tmp_path_factory.mktemp("finished_run")
    loop.pretrain(config(pretrain_data, num_epochs=1), str(workdir))
    return workdir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process(pretrain_data, tmp_path):
    """2 processes x 1 CPU device (gloo collectives) == 1 process x 8 devices, in float64."""
    port = _free_port()
    float64 = "--config.model.dtype=float64"
    # At XLA's default optimisation level: at level 0 (ENV's) XLA:CPU computes this float64
    # step to about float32 accuracy.
    env = {**ENV, "JAX_ENABLE_X64": "1",
           "XLA_FLAGS": with_flags("--xla_force_host_platform_device_count=1")}
    # Each process logs to a file: a pipe that the test does not read while it waits for the
    # other process fills up, and the blocked writer never reaches JAX's shutdown barrier.
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    processes = []
    for i, log in enumerate(logs):
        with open(log, "w") as stderr:
            processes.append(subprocess.Popen(
                command(pretrain_data, tmp_path / "two", "--config.num_epochs=1", float64,
                        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        f"--process_id={i}"),
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
    # The reference runs after them: beside them it took the cores that the two processes need
    # to reach their first collective within gloo's 30 s of each other.
    for process, log in zip(processes, logs):
        process.wait(timeout=600)
        assert process.returncode == 0, log.read_text()[-3000:]
    assert "JAX process 1/2" in logs[1].read_text()
    with jax.enable_x64(True):
        one = config(pretrain_data, num_epochs=1)
        one.model.dtype = "float64"
        loop.pretrain(one, str(tmp_path / "one"))
        multi, single = restore(tmp_path / "two", step=2), restore(tmp_path / "one", step=2)
        initial = jax.device_get(train_state.create_train_state(
            jax.random.key(one.seed), one, train_state.make_model(one), 1).params)
    assert int(multi.step) == int(single.step) == 2
    # Float64 programs that sum in other orders (gloo, 8 devices) differ by roundoff: ~1e3 eps64
    # ~ 2e-13 after 2 steps (as 1e-5 ~ 1e2 eps32 in float32), and 1e-10 keeps 500x of margin.
    for name in ("params", "batch_stats"):
        assert {x.dtype for x in jax.tree.leaves(getattr(multi, name))} == {np.dtype("float64")}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                     getattr(multi, name), getattr(single, name))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), single.params, initial)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the 2 steps changed the parameters


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
    with pytest.raises(OSError, match=f"Workdir {blocker / 'run'} is not writable"):
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
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        loop.pretrain(config(pretrain_data, **overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


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
