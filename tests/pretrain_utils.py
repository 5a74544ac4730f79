"""Shared helpers for tests that run pretraining: commands, configs and checkpoint restores;
`run_module` runs any entry point as a subprocess; `free_port` for multi-process runs."""

import os
import pathlib
import socket
import subprocess
import sys

from tests import tiny_config
from tests.xla_flags import with_flags
from vi_simsiam_jax import checkpoints, run_config, train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
# Training subprocesses (entry points, signals, resumes) run on one CPU device, the multi-device
# step being tested in-process, and all with the tiny config's 2 epochs: one program, which the
# persistent compilation cache (conftest.py) compiles once for all of them, at the test
# process's optimisation level.
ENV = {**os.environ, "XLA_FLAGS": with_flags("--xla_force_host_platform_device_count=1")}


def config(data: tuple[str, str], **overrides):
    """The tiny config on a prepared folder dataset `data` = (folder, tfds data_dir)."""
    result = tiny_config.get_config(data[0])
    result.data_dir = data[1]
    result.update(overrides)
    return result


def command(data: tuple[str, str], workdir, *flags: str) -> list[str]:
    """`python -m experiments.pretrain` with the tiny config on `data`."""
    return [sys.executable, "-m", "experiments.pretrain",
            f"--config={REPO / 'tests' / 'tiny_config.py'}:{data[0]}",
            f"--config.data_dir={data[1]}", f"--workdir={workdir}", *flags]


def run_module(module: str, *flags: str, check: bool = True,
               **kwargs) -> subprocess.CompletedProcess:
    """`python -m module *flags` in REPO with ENV, its output captured as text; with `check`,
    asserts that it exited 0 (the message: the end of its stderr). kwargs go to subprocess.run
    (timeout, or env and cwd instead of ENV and REPO)."""
    kwargs = {"cwd": REPO, "env": ENV, "capture_output": True, "text": True, **kwargs}
    completed = subprocess.run([sys.executable, "-m", module, *flags], **kwargs)
    if check:
        assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def restore(workdir, step: int | None = None):
    """The train state saved in a pretraining workdir (newest checkpoint or `step`)."""
    saved = run_config.load_config(str(workdir))
    abstract = train_state.abstract_train_state(saved, train_state.make_model(saved))
    manager = checkpoints.manager(str(workdir), read_only=True)
    return checkpoints.restore_latest(manager, abstract, step)


def free_port() -> int:
    """A TCP port free on this host now, for a multi-process run's coordinator."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
