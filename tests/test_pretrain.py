"""The pretraining loop: exact resume after SIGKILL, NaN handling, outputs, config errors."""

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from tests import tiny_config
from tests.pretrain_utils import ENV, REPO, command, config, restore
from vi_simsiam_jax import (augment, checkpoints, config_schema, datasets, errors, loop,
                            run_config, train)

def test_resume_after_sigkill_matches_uninterrupted_run(pretrain_data, tmp_path):
    """8 steps, checkpoints every 2: killed after the first, resumed, equal to a whole run."""
    killed = subprocess.Popen(command(pretrain_data, tmp_path / "killed"), cwd=REPO, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "killed" / "checkpoints" / "2" / "commit_success.txt"
    deadline = time.time() + 600
    while not first_checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    steps = [int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
             if p.name.isdigit()]
    assert 0 < max(steps) < 8
    # Started now, the uninterrupted run finds the step compiled in the persistent cache.
    # Its log goes to a file: a pipe left unread while the resumed run works could fill up.
    full_log = tmp_path / "full.log"
    with open(full_log, "w") as stderr:
        full = subprocess.Popen(command(pretrain_data, tmp_path / "full"), cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    resumed = subprocess.run(command(pretrain_data, tmp_path / "killed"), cwd=REPO, env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming at step" in resumed.stderr
    assert full.wait(timeout=600) == 0, full_log.read_text()[-3000:]

    full_state, resumed_state = restore(tmp_path / "full"), restore(tmp_path / "killed")
    assert int(full_state.step) == int(resumed_state.step) == 8
    # One compiled program (same config, one device) on the same batches from the same saved
    # state: a resumed run repeats the uninterrupted run's arithmetic bit for bit.
    for name in ("params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(full_state, name),
                     getattr(resumed_state, name))
    # The logs of the resumed run continue the step count, each step once.
    logged = [json.loads(line)["step"]
              for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8]


def _fresh_step_cache(monkeypatch):
    """The loop's pmapped steps are cached per `train.StepConfig` in the process: a function
    patched inside the step takes a cache of its own (the test's, dropped after it)."""
    monkeypatch.setattr(train, "_p_train_step", functools.cache(train._p_train_step.__wrapped__))


def test_nan_at_step_k_stops_and_keeps_last_good_checkpoint(pretrain_data, tmp_path, monkeypatch):
    nan_step = 3  # of the 4 steps of 1 epoch, checkpoints every 2
    nan_config = config(pretrain_data, num_epochs=1)
    original = augment.views

    def poisoned(images, sizes, positions, key, crops):
        bad = positions[0] // nan_config.batch_size == nan_step
        return [jnp.where(bad, np.float32(np.nan), view)
                for view in original(images, sizes, positions, key, crops)]

    monkeypatch.setattr(augment, "views", poisoned)
    _fresh_step_cache(monkeypatch)
    with pytest.raises(FloatingPointError, match=f"at step {nan_step} ") as stopped:
        loop.pretrain(nan_config, str(tmp_path))
    assert "--allow_config_change=learning_rate" in str(stopped.value)  # how to go on
    state = restore(tmp_path)
    assert int(state.step) == 2  # the newest checkpoint predates the bad step
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [2]

    # Going on with a lower rate: refused unless allowed, then recorded.
    monkeypatch.setattr(augment, "views", original)
    _fresh_step_cache(monkeypatch)
    lower = config(pretrain_data, num_epochs=1, learning_rate=nan_config.learning_rate / 2)
    with pytest.raises(errors.UserError, match=r"--allow_config_change=learning_rate"):
        loop.pretrain(lower, str(tmp_path))
    assert int(loop.pretrain(lower, str(tmp_path), allow_changes=["learning_rate"]).step) == 4
    history = [json.loads(line) for line in
               (tmp_path / run_config.HISTORY_FILE).read_text().splitlines()]
    assert [row["event"] for row in history] == ["start", "resume"]
    assert history[1]["step"] == 2
    assert history[1]["changed"] == {"learning_rate": [nan_config.learning_rate,
                                                       lower.learning_rate]}
    assert run_config.load_config(str(tmp_path)).learning_rate == lower.learning_rate


def _event_steps(workdir) -> list[tuple[int, str]]:
    """(step, tag) of every scalar in workdir's TensorBoard event files."""
    return [(event.step, value.tag)
            for path in (workdir / "tensorboard").glob("events.out.tfevents.*")
            for record in tf.data.TFRecordDataset(str(path))
            for event in [tf.compat.v1.Event.FromString(record.numpy())]
            for value in event.summary.value]


def test_a_resumed_run_logs_each_step_once_and_may_find_its_data_moved(pretrain_data,
                                                                       tmp_path):
    """A run that logged steps 2 and 4 but whose checkpoint 4 is gone resumes at 2: its rows
    of step 4 are dropped from metrics.jsonl and the event files, then written once. The
    prepared data, copied to another data_dir, may be named there (same fingerprint); data
    prepared from other images may not."""
    workdir = tmp_path / "work"
    loop.pretrain(config(pretrain_data, num_epochs=1), str(workdir))
    shutil.rmtree(workdir / "checkpoints" / "4")
    moved = tmp_path / "moved_tfds"
    shutil.copytree(pretrain_data[1], moved)
    loop.pretrain(config((pretrain_data[0], str(moved)), num_epochs=1), str(workdir))
    rows = [json.loads(line)["step"]
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4]
    events = _event_steps(workdir)
    assert sorted(events) == sorted(set(events)) and {step for step, _ in events} == {2, 4}
    assert not list(workdir.rglob("*.tmp"))

    other = tmp_path / "other"
    shutil.copytree(pretrain_data[0], other)
    next((other / "train").rglob("*.JPEG")).unlink()  # one image fewer: other data
    with pytest.raises(errors.UserError, match="made with other data"):
        loop.pretrain(config((pretrain_data[0], str(tmp_path / "other_tfds")), num_epochs=1,
                             dataset=str(other)), str(workdir))


def test_a_mistyped_path_writes_nothing_and_the_corrected_command_trains(pretrain_data,
                                                                          tmp_path):
    """The command line a user would type: one paragraph naming the flag as typed, status 1,
    no traceback, no workdir; then the corrected command trains in that workdir."""
    workdir = tmp_path / "work"
    typo = f"--config.dataset={tmp_path / 'nowhere'}"
    result = subprocess.run(command(pretrain_data, workdir, typo), cwd=REPO, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"FATAL: {typo}: Dataset folder {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
    result = subprocess.run(command(pretrain_data, workdir, "--config.num_epochs=1"), cwd=REPO,
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(restore(workdir).step) == 4


def test_run_compiles_its_step_once_and_writes_checkpoints_events_and_metrics(pretrain_data,
                                                                             tmp_path):
    """Four steps, at most one compilation of the pmapped step and of the model's
    initialisation (counted as lowerings, which a persistent compilation cache does not skip;
    none if an earlier test of this process ran the same), and none for a run that differs only
    in its learning rate and length (the step's runtime `Hyperparameters`); then the files a
    run writes."""
    lowered = []

    def listener(event, duration, fun_name=None, **kwargs):
        # The pmapped step (pmap wraps it as "_fun") and train_state.init_variables' "init".
        if (event == "/jax/core/compile/jaxpr_to_mlir_module_duration"
                and fun_name in ("jit(_fun)", "jit(init)")):
            lowered.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        final = loop.pretrain(config(pretrain_data, num_epochs=1), str(tmp_path))
        first = len(lowered)
        loop.pretrain(config(pretrain_data, num_epochs=2, learning_rate=0.02),
                      str(tmp_path / "another"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first <= 2 and len(lowered) == first, lowered
    assert int(final.step) == 4
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = {"loss", "kappa_mean", "kappa_min", "kappa_max", "kappa_std", "cosine", "z_std",
                "learning_rate", "grad_norm", "images_per_sec", "epoch"}
    assert expected <= records[-1].keys()
    assert json.loads((tmp_path / "config.json").read_text())["dataset"] == pretrain_data[0]


@pytest.mark.parametrize("override,message", [
    ("--config.learning_rate=-1", "config.learning_rate"),  # the loop's validation
    ("--config.no_such_field=1", "no_such_field"),  # ml_collections' flag parser
])
def test_bad_flags_give_clear_errors(pretrain_data, tmp_path, override, message):
    result = subprocess.run(command(pretrain_data, tmp_path, override), cwd=REPO, env=ENV,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("field,value", [
    ("method", "byol"), ("model.bn_views", "shared"), ("loss_reduction", "max"),
    ("batch_size", 0), ("batch_size", 6), ("warmup_epochs", 3), ("local_scale", (0.5, 0.2)),
])
def test_invalid_config_values_are_named(field, value):
    """`config_schema.validate` (which pretraining runs first, see the flags test above) names
    the field, its value and what it must be; batch 6 does not split over 4 devices."""
    bad = tiny_config.get_config()
    parent, _, name = ("." + field).rpartition(".")
    (bad[parent[1:]] if parent else bad)[name] = value
    with pytest.raises(ValueError, match=rf"config\.{field} = {re.escape(repr(value))}"):
        config_schema.validate(bad, num_devices=4)
    config_schema.validate(tiny_config.get_config(), num_devices=4)


def test_missing_dataset_names_the_path(tmp_path):
    config = tiny_config.get_config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        loop.pretrain(config, str(tmp_path / "work"))


@dataclasses.dataclass
class _FeatureNorm:
    """An in-training evaluation added without editing the loop: the mean feature norm."""

    examples: datasets.Examples
    every_epochs: int = 2

    def evaluate(self, frozen):
        return {"feature_norm": float(np.linalg.norm(
            frozen.features(self.examples, 8, 16).features, axis=1).mean())}


def test_knn_monitor_logs_a_curve_and_leaves_training_unchanged(pretrain_data, tmp_path):
    """eval_every_epochs=1 over 2 epochs: kNN top-1 on the local split at steps 4 and 8 in
    metrics.jsonl and TensorBoard, and the same final state, bit for bit, as with it off; an
    evaluation passed to `pretrain` runs at its own interval (step 8) beside it."""

    final = {}
    examples = datasets.load_examples(datasets.get_builder(pretrain_data[0],
                                                           data_dir=pretrain_data[1]), "train")
    for every in (1, 0):
        workdir = tmp_path / f"eval_every_{every}"
        final[every] = loop.pretrain(config(pretrain_data, eval_every_epochs=every),
                                     str(workdir),
                                     evaluations=[_FeatureNorm(examples)] if every else ())
    fields = [jax.device_get((s.step, s.params, s.batch_stats, s.opt_state))
              for s in (final[1], final[0])]
    jax.tree.map(np.testing.assert_array_equal, *fields)
    records = [json.loads(line) for line in
               (tmp_path / "eval_every_1" / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if "knn_top1_local_val" in r]
    assert [r["step"] for r in curve] == [4, 8]
    assert [r["step"] for r in records if "feature_norm" in r] == [8]
    assert all(0 <= r["knn_top1_local_val"] <= 100 and r["knn_eval_s"] > 0 for r in curve)
    assert not any("knn_top1_local_val" in json.loads(line) for line in
                   (tmp_path / "eval_every_0" / "metrics.jsonl").read_text().splitlines())
    events = list((tmp_path / "eval_every_1" / "tensorboard").glob("events.out.tfevents.*"))
    tags = {(event.step, value.tag)
            for path in events for record in tf.data.TFRecordDataset(str(path))
            for event in [tf.compat.v1.Event.FromString(record.numpy())]
            for value in event.summary.value}
    assert {(4, "knn_top1_local_val"), (8, "knn_top1_local_val")} <= tags


def test_one_run_per_workdir_and_a_killed_run_leaves_no_lock(pretrain_data, tmp_path):
    """While a run trains, a second command on its workdir stops before writing anything and
    names the first; once the first is SIGKILLed its lock is gone."""
    workdir = tmp_path / "work"
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:  # a file, not a pipe that could fill up unread
        first = subprocess.Popen(command(pretrain_data, workdir, "--config.num_epochs=200"),
                                 cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        checkpoint = workdir / "checkpoints" / "2" / "commit_success.txt"
        deadline = time.time() + 600
        while not checkpoint.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, log.read_text()[-3000:]
        second = subprocess.run(command(pretrain_data, workdir, "--config.num_epochs=200"),
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode != 0
    assert f"is in use by another run (process {first.pid} on " in second.stderr
    assert "Resuming" not in second.stderr and "Starting at step" not in second.stderr
    with checkpoints.workdir_lock(str(workdir)):  # the killed run's lock died with it
        assert f"process {os.getpid()} " in (workdir / checkpoints.LOCK_FILE).read_text()
