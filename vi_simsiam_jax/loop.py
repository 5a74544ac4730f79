"""The pretraining loop around the pure step of `train`: input, checkpoints, exact resume,
metrics and logging, the kNN monitor, and the checks that fail before anything is written.
Preemption, lost peers and exit statuses are `run_control`'s.

Batches and step keys depend only on (seed, step), so a resumed run continues exactly as an
uninterrupted one.
"""

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import jax_utils

from vi_simsiam_jax import (checkpoints, datasets, errors, input_pipeline, losses, methods,
                            models, run_config, run_control, train)
from vi_simsiam_jax.cpu import layers
from vi_simsiam_jax.evaluation import encoder, knn_monitor
from vi_simsiam_jax.metric_writer import MetricWriter
from vi_simsiam_jax.train_state import (AXIS_NAME, EMA_SCHEDULES, TrainState, create_train_state,
                                        make_model)


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises errors.UserError naming the first config field with an invalid value."""
    checks = [
        ("method", config.method in methods.REGISTRY, f"one of {sorted(methods.REGISTRY)}"),
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
            raise errors.UserError(f"Invalid config.{name} = {value!r}: must be {expected}.",
                                   f"config.{name}")


def _unreplicate(tree: Any) -> Any:
    """This host's first copy of pmapped outputs, read locally (no cross-host collective)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def _prepared_dataset(config: ml_collections.ConfigDict) -> datasets.VisImages:
    """The prepared dataset config names; crops may not exceed the shorter side of a fast.ai
    variant (e.g. 160 px for imagenette2-160)."""
    try:
        builder = datasets.prepare_from_config(config)
    except errors.UserError as error:  # a dataset, archive or data_dir of the config
        raise type(error)(str(error), f"config.{error.setting}") from None
    image_size = builder.builder_config.archive_stem.rsplit("-", 1)[-1]
    for name in ("global_size", "local_size"):
        if image_size.isdigit() and config[name] > int(image_size):
            raise errors.UserError(f"Invalid config.{name} = {config[name]}: larger than the "
                                   f"{image_size} px images of {config.dataset}.",
                                   f"config.{name}")
    return builder


def _make_workdir(workdir: str) -> None:
    """Creates workdir; fails before training if it cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise errors.UserError(f"Workdir {workdir} is not writable: {error}", "workdir"
                               ) from error


def pretrain(config: ml_collections.ConfigDict, workdir: str, peer_timeout_s: float = 120.0,
             *, lock_workdir: bool = True, allow_changes: Sequence[str] = ()) -> TrainState:
    """Pretrains on config.dataset; resumes from the newest checkpoint in workdir if any.

    Everything the user chose is checked before anything is written: the config's values,
    the dataset (prepared here if need be), the workdir, and that a workdir's earlier run has
    the same config, except fields that may change on resume and those in `allow_changes`
    (recorded in the workdir's config history; `run_config`). Mistakes raise
    errors.UserError. A workdir in use by another live run raises checkpoints.WorkdirInUse;
    lock_workdir=False runs without the lock (filesystems without locking). Only damaged
    checkpoint files are moved aside; one of another structure raises
    checkpoints.CheckpointMismatch and an I/O error is raised, moving nothing.

    Every config.eval_every_epochs epochs (0: never) the kNN monitor
    (`knn_monitor.LocalSplitKnn`) scores the encoder on the local split of train and its top-1
    goes to metrics.jsonl and TensorBoard; it reads the state and changes nothing of the run.

    Stops with FloatingPointError at the first non-finite step, after the last good
    checkpoint is safely on disk (the bad state is never saved). On SIGTERM it saves a
    checkpoint after the current step and raises run_control.Preempted. Several processes: see
    `run_control` (a lost or failed peer raises LostPeer or ends the process; relaunching every
    process with the same command resumes from the newest checkpoint).
    """
    validate_config(config, jax.device_count())
    builder = _prepared_dataset(config)
    examples = datasets.load_examples(builder, "train")
    steps_per_epoch = input_pipeline.steps_per_epoch(len(examples), config.batch_size)
    if steps_per_epoch == 0:
        raise errors.UserError(f"config.batch_size = {config.batch_size} exceeds the "
                               f"{len(examples)} training images of {config.dataset}.",
                               "config.batch_size")
    history_row = run_config.config_change(workdir, config, datasets.fingerprint(builder),
                                           allow_changes)
    _make_workdir(workdir)
    with checkpoints.workdir_lock(workdir, enabled=lock_workdir):
        return _train(config, workdir, builder, examples, steps_per_epoch, peer_timeout_s,
                      history_row)


def _non_finite(step: int, metrics: dict[str, Any], config: ml_collections.ConfigDict,
                directory: str, latest: int | None) -> FloatingPointError:
    return FloatingPointError(
        f"Non-finite loss or gradients at step {step} (loss={metrics['loss']}, grad_norm="
        f"{metrics['grad_norm']}); stopping. The newest checkpoint in {directory} (step "
        f"{latest}) predates it and is intact. A resume repeats the same steps exactly and "
        "meets the same failure: resume with a lower learning rate, allowing that change "
        f"(experiments.pretrain: --config.learning_rate={config.learning_rate / 2:g} "
        "--allow_config_change=learning_rate); the change is recorded in the workdir's "
        f"{run_config.HISTORY_FILE}.")


def _train(config: ml_collections.ConfigDict, workdir: str, builder: datasets.VisImages,
           examples: datasets.Examples, steps_per_epoch: int, peer_timeout_s: float,
           history_row: dict[str, Any] | None) -> TrainState:
    """`pretrain` once its checks passed and the workdir is this run's: resumes or starts,
    then trains, with every failure seen as such by every process (`run_control`)."""
    checkpoint_manager = checkpoints.manager(workdir, config)
    watchdog = run_control.Watchdog(peer_timeout_s, lambda cause: run_control.lost_peer_message(
        cause, checkpoint_manager.latest_step()))
    try:
        with run_control.failures_reported(watchdog, checkpoint_manager.latest_step):
            model = make_model(config)
            rng = jax.random.key(config.seed)
            # Checkpoints hold host (numpy) arrays: the same files for any device or host count.
            state = jax.device_get(create_train_state(rng, config, model, steps_per_epoch))
            restored = checkpoints.restore_latest(checkpoint_manager, state,
                                                  quarantine_corrupt=True)
            state = restored if restored is not None else state
            start_step = int(state.step)
            run_config.save_config(workdir, config, history_row, start_step)
            logging.info("%s at step %d of %d (%d per epoch).",
                         "Resuming" if restored is not None else "Starting", start_step,
                         config.num_epochs * steps_per_epoch, steps_per_epoch)
            source = input_pipeline.pretrain_source(
                examples, config.source_images,
                cache_dir=os.path.join(builder.data_dir, "decoded"),
                stream_max_side=config.stream_max_side)
            # An endless stream, of which the loop takes what it needs.
            batches = input_pipeline.pretrain_batches(source, batch_size=config.batch_size,
                                                      seed=config.seed, start_step=start_step)
            batches = jax_utils.prefetch_to_device(
                ({k: batch[k] for k in ("image", "size", "position")} for batch in batches), 2)
            # On the step's own mesh axis: an array placed under another axis name has another
            # type for jit, so the second step (fed the first step's output) would compile again.
            state = jax_utils.replicate(state, axis_name=AXIS_NAME)
            return _run_steps(config, workdir, model, rng, state, batches, steps_per_epoch,
                              examples, checkpoint_manager, watchdog)
    finally:
        watchdog.stop()
        checkpoint_manager.wait_until_finished()
        checkpoint_manager.close()


class _StepLog:
    """Metrics of the steps since the last log line: averaged, written (`MetricWriter`),
    shown on the progress bar and logged every config.log_every_steps."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, start_step: int,
                 steps_per_epoch: int):
        self._batch_size, self._steps_per_epoch = config.batch_size, steps_per_epoch
        self._total = config.num_epochs * steps_per_epoch
        self.writer = MetricWriter(workdir, start_step)
        self._progress = tqdm.tqdm(total=self._total, initial=start_step, unit="step",
                                   disable=jax.process_index() != 0)
        self._pending: list[dict[str, float]] = []
        self._since = time.perf_counter()

    def add(self, metrics: dict[str, Any]) -> None:
        self._pending.append({k: float(v) for k, v in metrics.items()})
        self._progress.update()

    def flush(self, done: int) -> None:
        now = time.perf_counter()
        summary = {k: float(np.mean([m[k] for m in self._pending])) for k in self._pending[0]}
        summary.update(epoch=done / self._steps_per_epoch,
                       images_per_sec=len(self._pending) * self._batch_size / (now - self._since))
        self.writer.write(done, summary)
        shown = {"loss": f"{summary['loss']:.4f}", "cos": f"{summary['cosine']:.3f}"}
        if "kappa_mean" in summary:
            shown["kappa"] = f"{summary['kappa_mean']:.1f}"
        self._progress.set_postfix(shown)
        logging.info("step %d/%d: %s, %.1f images/s", done, self._total,
                     ", ".join(f"{k} {v}" for k, v in shown.items()), summary["images_per_sec"])
        self._pending, self._since = [], now

    def close(self) -> None:
        self._progress.close()
        self.writer.close()


def _run_steps(config: ml_collections.ConfigDict, workdir: str, model: Any, rng: jax.Array,
               state: TrainState, batches: Iterator[Any], steps_per_epoch: int,
               examples: datasets.Examples, checkpoint_manager: Any,
               watchdog: run_control.Watchdog) -> TrainState:
    """The steps from `state` (replicated) to the end, with logging, the kNN monitor,
    checkpoints and the SIGTERM vote; returns the final state (one copy)."""
    total_steps = config.num_epochs * steps_per_epoch
    start_step = int(_unreplicate(state.step))
    p_train_step = train.make_p_train_step(model, config, steps_per_epoch)
    # The views and the model draw from this key, the stream position and the step.
    step_rng = jax_utils.replicate(jax.random.fold_in(rng, 1))
    monitor = (knn_monitor.LocalSplitKnn(examples, config.batch_size, config.global_size)
               if config.eval_every_epochs else None)
    eval_model = make_model(config, axis_name=None) if monitor else None
    log = _StepLog(config, workdir, start_step, steps_per_epoch)
    preemption = run_control.Preemption()
    try:
        for step in range(start_step, total_steps):
            state, metrics = p_train_step(state, next(batches), step_rng)
            metrics = jax.device_get(_unreplicate(metrics))
            if not metrics.pop("finite"):
                raise _non_finite(step, metrics, config, os.fspath(checkpoint_manager.directory),
                                  checkpoint_manager.latest_step())
            log.add(metrics)
            watchdog.beat()
            done = step + 1
            if monitor and done % (config.eval_every_epochs * steps_per_epoch) == 0:
                variables = _unreplicate({"params": state.params,
                                          "batch_stats": state.batch_stats})
                with watchdog.paused():  # a local computation, as long as it takes on each
                    evaluation = monitor.evaluate(
                        encoder.FrozenEncoder(config, eval_model, variables, done))
                    run_control.barrier(f"evaluated {done}")
                log.writer.write(done, evaluation)
                logging.info("step %d: kNN top-1 on the local split %.2f%% (%.1f s)", done,
                             evaluation["knn_top1_local_val"], evaluation["knn_eval_s"])
            if done % config.log_every_steps == 0 or done == total_steps:
                log.flush(done)
            preempted = preemption.requested(done)
            if done % config.checkpoint_every_steps == 0 or done == total_steps or preempted:
                with watchdog.paused():  # until every process has saved
                    checkpoints.save(checkpoint_manager, done,
                                     jax.device_get(_unreplicate(state)))
                    run_control.barrier(f"saved {done}")
            if preempted:
                raise run_control.Preempted(
                    f"Preempted (SIGTERM) after step {done}; checkpoint saved in "
                    f"{checkpoint_manager.directory}. Rerun the same command to resume.")
    finally:
        preemption.restore()
        log.close()
    return _unreplicate(state)
