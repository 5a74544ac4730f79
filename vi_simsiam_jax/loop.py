"""The pretraining loop around the pure step of `train`: input, checkpoints, exact resume,
metrics and logging, the kNN monitor, preemption, and the checks that fail before any
training.

Batches and step keys depend only on (seed, step), so a resumed run continues exactly as an
uninterrupted one.
"""

import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging
from flax import jax_utils

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
    """Turns SIGTERM into a flag the loop checks after every step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting.")
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; rerun to resume."""


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Pretrains on config.dataset; resumes from the newest checkpoint in workdir if any.

    Every config.eval_every_epochs epochs (0: never) the kNN monitor
    (`knn_monitor.LocalSplitKnn`) scores the encoder on the local split of train and its top-1
    goes to metrics.jsonl and TensorBoard; it reads the state and changes nothing of the run.

    Stops with FloatingPointError at the first non-finite step, after the
    last good checkpoint is safely on disk (the bad state is never saved). On SIGTERM it saves
    a checkpoint after the current step and raises Preempted.
    """
    validate_config(config, jax.device_count())
    _check_dataset_and_crops(config)
    _check_workdir(workdir)
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
    eval_model = make_model(config, axis_name=None)
    writer = MetricWriter(workdir)
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                         disable=jax.process_index() != 0)
    preemption = _Preemption()
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
            done = step + 1
            if monitor and done % (config.eval_every_epochs * steps_per_epoch) == 0:
                variables = _unreplicate({"params": state.params,
                                          "batch_stats": state.batch_stats})
                evaluation = monitor.evaluate(
                    encoder.FrozenEncoder(config, eval_model, variables, done))
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
            if (done % config.checkpoint_every_steps == 0 or done == total_steps
                    or preemption.requested):
                checkpoints.save(checkpoint_manager, done, jax.device_get(_unreplicate(state)))
            if preemption.requested:
                raise Preempted(f"Preempted (SIGTERM) after step {done}; checkpoint saved in "
                                f"{checkpoint_manager.directory}. Rerun the same command to "
                                "resume.")
    finally:
        preemption.restore()
        checkpoint_manager.wait_until_finished()
        checkpoint_manager.close()
        progress.close()
        writer.close()
    return _unreplicate(state)
