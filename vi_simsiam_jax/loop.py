"""The pretraining loop around the pure step of `train`: input, checkpoints, exact resume,
metrics and logging, the kNN monitor, preemption, and the checks that fail before any
training.

Batches and step keys depend only on (seed, step), so a resumed run continues exactly as an
uninterrupted one.
"""

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging
from flax import jax_utils
from jax.experimental import multihost_utils

from vi_simsiam_jax import checkpoints, datasets, input_pipeline, losses, models, train
from vi_simsiam_jax.cpu import layers
from vi_simsiam_jax.evaluation import encoder, knn_monitor
from vi_simsiam_jax.train_state import (AXIS_NAME, EMA_SCHEDULES, TrainState, create_train_state,
                                        make_model)


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ValueError naming the first config field with an invalid value."""
    checks = [
        ("method", config.method in models.METHODS, f"one of {models.METHODS}"),
        ("target", config.target in models.TARGETS, f"one of {models.TARGETS}"),
        ("loss_reduction", config.loss_reduction in losses.REDUCTIONS,
         f"one of {losses.REDUCTIONS}"),
        ("model.bn_views", config.model.bn_views in models.BN_VIEWS, f"one of {models.BN_VIEWS}"),
        ("model.stem", config.model.stem in models.STEMS, f"one of {models.STEMS}"),
        ("model.kappa_map", config.model.kappa_map in models.KAPPA_MAPS,
         f"one of {models.KAPPA_MAPS}"),
        ("model.kappa_min", config.model.kappa_min >= 0, ">= 0"),
        ("conv", config.get("conv", "auto") in layers.LAYER_CHOICES,
         f"one of {layers.LAYER_CHOICES}"),
        ("learning_rate", config.learning_rate > 0, "positive"),
        ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("momentum", 0 <= config.momentum < 1, "in [0, 1)"),
        ("ema_decay", 0 <= config.ema_decay < 1, "in [0, 1)"),
        ("ema_schedule", config.ema_schedule in EMA_SCHEDULES, f"one of {EMA_SCHEDULES}"),
        ("num_epochs", config.num_epochs > 0, "positive"),
        ("warmup_epochs", 0 <= config.warmup_epochs <= config.num_epochs,
         "in [0, num_epochs]"),
        ("global_crops", config.global_crops >= 1, ">= 1"),
        ("local_crops", config.local_crops >= 0, ">= 0"),
        ("global_crops", config.global_crops + config.local_crops >= 2,
         "with local_crops, at least 2 views"),
        ("batch_size", config.batch_size > 0 and config.batch_size % num_devices == 0,
         f"a positive multiple of the {num_devices} devices"),
        ("source_images", config.source_images in input_pipeline.SOURCES,
         f"one of {input_pipeline.SOURCES}"),
        ("stream_max_side", config.stream_max_side >= config.global_size,
         "at least global_size"),
        ("log_every_steps", config.log_every_steps > 0, "positive"),
        ("eval_every_epochs", config.eval_every_epochs >= 0, ">= 0 (0: no kNN monitor)"),
        ("checkpoint_every_steps", config.checkpoint_every_steps > 0, "positive"),
        ("keep_checkpoints", config.keep_checkpoints > 0, "positive"),
    ]
    for name, scale in (("global_scale", config.global_scale),
                        ("local_scale", config.local_scale)):
        checks.append((name, 0 < scale[0] <= scale[1] <= 1, "0 < min <= max <= 1"))
    for name, ok, expected in checks:
        if not ok:
            value = config
            for part in name.split("."):
                value = value[part]
            raise ValueError(f"Invalid config.{name} = {value!r}: must be {expected}.")


class MetricWriter:
    """Process 0 writes metrics to workdir/metrics.jsonl and TensorBoard; others write nothing."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        with self._summary.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
        self._summary.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._summary.close()


def _unreplicate(tree: Any) -> Any:
    """This host's first copy of pmapped outputs, read locally (no cross-host collective)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def _check_dataset_and_crops(config: ml_collections.ConfigDict) -> None:
    """The dataset must be known; crops may not exceed the shorter side of a fast.ai variant
    (e.g. 160 px for imagenette2-160)."""
    try:
        stem = datasets.resolve_config(config.dataset).archive_stem
    except ValueError as error:
        raise ValueError(f"Invalid config.dataset: {error}") from error
    image_size = stem.rsplit("-", 1)[-1]
    if not image_size.isdigit():
        return
    for name in ("global_size", "local_size"):
        if config[name] > int(image_size):
            raise ValueError(f"Invalid config.{name} = {config[name]}: larger than the "
                             f"{image_size} px images of {stem}.")


def _check_workdir(workdir: str) -> None:
    """Fails before training if workdir cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(f"Workdir {workdir} is not writable: {error}") from error


class _Preemption:
    """SIGTERM as a decision the loop reads after every step. One process: a flag its handler
    sets. Several processes: JAX's preemption sync point (jax.distributed's notifier catches a
    SIGTERM sent to any of them), so that all agree on the step at which to save and stop."""

    def __init__(self):
        self._multihost = jax.process_count() > 1
        self._requested = False
        if not self._multihost:  # a Python handler would replace the notifier's
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting.")
        self._requested = True

    def requested(self, done: int) -> bool:
        """Whether to save and stop after step `done`; every process calls it at every step."""
        if self._multihost:
            return multihost_utils.reached_preemption_sync_point(done)
        return self._requested

    def restore(self) -> None:
        if not self._multihost:
            signal.signal(signal.SIGTERM, self._previous)


# Exit status of a process that stopped because another process of its run was lost (EX_TEMPFAIL:
# relaunching every process resumes the run).
EXIT_LOST_PEER = 75


class LostPeer(Exception):
    """A collective of a multi-host run failed: another process of the run has most likely died.
    The process should exit (EXIT_LOST_PEER) without JAX's shutdown barrier, which would wait
    for the lost process."""


class _Watchdog:
    """In a multi-host run, ends this process (status EXIT_LOST_PEER, with a message) when a step
    makes no progress for timeout_s: a lost peer that no collective reports, e.g. one that hangs.
    Armed by the first `beat` (the compilation does not count) and between `pause` and the
    next `beat` not at all."""

    def __init__(self, timeout_s: float, describe: Callable[[], str]):
        self._timeout_s, self._describe = timeout_s, describe
        self._deadline: float | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
        if jax.process_count() > 1:
            self._thread.start()

    def beat(self) -> None:
        self._deadline = time.monotonic() + self._timeout_s

    def pause(self) -> None:
        self._deadline = None

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            if self._deadline is not None and time.monotonic() > self._deadline:
                sys.stderr.write(f"\nNo progress for {self._timeout_s:g} s. {self._describe()}\n")
                sys.stderr.flush()
                os._exit(EXIT_LOST_PEER)


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; rerun to resume."""


def pretrain(config: ml_collections.ConfigDict, workdir: str, peer_timeout_s: float = 120.0
             ) -> TrainState:
    """Pretrains on config.dataset; resumes from the newest checkpoint in workdir if any.

    Every config.eval_every_epochs epochs (0: never) the kNN monitor
    (`knn_monitor.LocalSplitKnn`) scores the encoder on the local split of train and its top-1
    goes to metrics.jsonl and TensorBoard; it reads the state and changes nothing of the run.

    Stops with FloatingPointError at the first non-finite step, after the
    last good checkpoint is safely on disk (the bad state is never saved). On SIGTERM it saves
    a checkpoint after the current step and raises Preempted. A workdir in use by another live
    run raises checkpoints.WorkdirInUse before anything is written.

    Several processes: a failed collective (another process died) raises LostPeer; a step that
    makes no progress for peer_timeout_s ends the process (`_Watchdog`). Relaunching every
    process with the same command resumes from the newest checkpoint.
    """
    validate_config(config, jax.device_count())
    _check_dataset_and_crops(config)
    _check_workdir(workdir)
    with checkpoints.workdir_lock(workdir):
        return _pretrain(config, workdir, peer_timeout_s)


def _pretrain(config: ml_collections.ConfigDict, workdir: str, peer_timeout_s: float
              ) -> TrainState:
    """`pretrain` once its checks passed and the workdir is this run's."""
    checkpoints.save_config(workdir, config)

    builder = datasets.prepare_from_config(config)
    examples = datasets.load_examples(builder, "train")
    steps_per_epoch = input_pipeline.steps_per_epoch(len(examples), config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"config.batch_size = {config.batch_size} exceeds the "
                         f"{len(examples)} training images of {config.dataset}.")
    total_steps = config.num_epochs * steps_per_epoch

    model = make_model(config)
    rng = jax.random.key(config.seed)
    # Checkpoints hold host (numpy) arrays: the same files for any device count or host count.
    state = jax.device_get(create_train_state(rng, config, model, steps_per_epoch))
    checkpoint_manager = checkpoints.manager(workdir, config)
    restored = checkpoints.restore_latest(checkpoint_manager, state, quarantine_corrupt=True)
    state = restored if restored is not None else state
    start_step = int(state.step)
    logging.info("%s at step %d of %d (%d per epoch).",
                 "Resuming" if restored is not None else "Starting", start_step, total_steps,
                 steps_per_epoch)

    # An endless stream, of which the loop takes what it needs.
    source = input_pipeline.pretrain_source(
        examples, config.source_images, cache_dir=os.path.join(builder.data_dir, "decoded"),
        stream_max_side=config.stream_max_side)
    batches = input_pipeline.pretrain_batches(source, batch_size=config.batch_size,
                                              seed=config.seed, start_step=start_step)
    batches = jax_utils.prefetch_to_device(
        ({k: batch[k] for k in ("image", "size", "position")} for batch in batches), 2)
    p_train_step = train.make_p_train_step(model, config, steps_per_epoch)
    # The views and the model draw from this key, the stream position and the step.
    step_rng = jax_utils.replicate(jax.random.fold_in(rng, 1))
    # On the step's own mesh axis: an array placed under another axis name has another type
    # for jit, so the second step (fed the first step's output) would compile again.
    state = jax_utils.replicate(state, axis_name=AXIS_NAME)
    monitor = (knn_monitor.LocalSplitKnn(examples, config.batch_size, config.global_size)
               if config.eval_every_epochs else None)
    eval_model = make_model(config, axis_name=None) if monitor else None
    writer = MetricWriter(workdir)
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                         disable=jax.process_index() != 0)
    preemption = _Preemption()

    def lost_peer(cause: str) -> str:
        return (f"Process {jax.process_index()} of {jax.process_count()}: {cause}; another process "
                "of the run has most likely died (killed, out of memory, host lost). Relaunch "
                "all processes with the same command: the run resumes from the newest checkpoint "
                f"(step {checkpoint_manager.latest_step()}).")

    watchdog = _Watchdog(peer_timeout_s, lambda: lost_peer("no step has completed"))
    pending: list[dict[str, float]] = []
    last_log = time.perf_counter()
    try:
        for step in range(start_step, total_steps):
            state, metrics = p_train_step(state, next(batches), step_rng)
            metrics = jax.device_get(_unreplicate(metrics))
            if not metrics.pop("finite"):
                raise FloatingPointError(
                    f"Non-finite loss or gradients at step {step} (loss={metrics['loss']}, "
                    f"grad_norm={metrics['grad_norm']}); stopping. The newest checkpoint in "
                    f"{checkpoint_manager.directory} predates it and is intact.")
            pending.append({k: float(v) for k, v in metrics.items()})
            progress.update()
            watchdog.beat()
            done = step + 1
            if monitor and done % (config.eval_every_epochs * steps_per_epoch) == 0:
                variables = _unreplicate({"params": state.params,
                                          "batch_stats": state.batch_stats})
                watchdog.pause()  # a local computation, as long as it takes
                evaluation = monitor.evaluate(
                    encoder.FrozenEncoder(config, eval_model, variables, done))
                watchdog.beat()
                writer.write(done, evaluation)
                logging.info("step %d: kNN top-1 on the local split %.2f%% (%.1f s)", done,
                             evaluation["knn_top1_local_val"], evaluation["knn_eval_s"])
            if done % config.log_every_steps == 0 or done == total_steps:
                now = time.perf_counter()
                summary = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                summary.update(epoch=done / steps_per_epoch,
                               images_per_sec=len(pending) * config.batch_size / (now - last_log))
                writer.write(done, summary)
                shown = {"loss": f"{summary['loss']:.4f}", "cos": f"{summary['cosine']:.3f}"}
                if "kappa_mean" in summary:
                    shown["kappa"] = f"{summary['kappa_mean']:.1f}"
                progress.set_postfix(shown)
                logging.info("step %d/%d: %s, %.1f images/s", done, total_steps,
                             ", ".join(f"{k} {v}" for k, v in shown.items()),
                             summary["images_per_sec"])
                pending, last_log = [], now
            preempted = preemption.requested(done)
            if (done % config.checkpoint_every_steps == 0 or done == total_steps
                    or preempted):
                checkpoints.save(checkpoint_manager, done, jax.device_get(_unreplicate(state)))
            if preempted:
                watchdog.stop()  # every process stops here; none is lost
                raise Preempted(f"Preempted (SIGTERM) after step {done}; checkpoint saved in "
                                f"{checkpoint_manager.directory}. Rerun the same command to "
                                "resume.")
    except jax.errors.JaxRuntimeError as error:
        if jax.process_count() == 1:
            raise
        raise LostPeer(lost_peer(f"a collective failed ({str(error).splitlines()[0]})")
                       ) from error
    finally:
        preemption.restore()
        checkpoint_manager.wait_until_finished()
        checkpoint_manager.close()
        progress.close()
        writer.close()
    watchdog.stop()
    return _unreplicate(state)
