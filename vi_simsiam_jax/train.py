"""Pretraining: train state, optimiser and the pure, data-parallel training step.

The step is a pure function `(state, batch, rng) -> (state, metrics)` run under `jax.pmap` over
every local device (axis "batch"): BatchNorm statistics are synchronised across devices through
the models' `axis_name` and gradients are averaged with `lax.pmean`, so one step on N devices
equals one step on a single device with the whole batch. On a single device there is nothing to
synchronise and the model gets no axis: XLA:CPU would still run every collective (26 all-reduces,
~0.1 s of a 1 s step at 64 px). `train_and_evaluate` is the loop around it: input, checkpoints,
exact resume, logging.
"""

import functools
import json
import os
import signal
import time
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
import tqdm
from absl import logging
from flax import jax_utils, traverse_util
from flax.training import train_state

from vi_simsiam_jax import checkpoints, datasets, input_pipeline, losses, models
from vi_simsiam_jax import conv as conv_lib

AXIS_NAME = "batch"
Array = jax.Array


class TrainState(train_state.TrainState):
    """params/opt_state/step from flax, plus BN statistics and the EMA target (BYOL only)."""

    batch_stats: Any
    target_variables: Any = None  # {"params", "batch_stats"} of the EMA target, or None


def data_parallel_axis() -> str | None:
    """AXIS_NAME when the step spans more than one device (on any host), else None."""
    return AXIS_NAME if jax.device_count() > 1 else None


def make_model(config: ml_collections.ConfigDict, axis_name: str | None | Literal["auto"] = "auto"
               ) -> models.SiameseNet:
    """The SiameseNet described by config.method and config.model; its BatchNorms synchronise
    over `axis_name` ("auto": `data_parallel_axis()`; None: per-device statistics)."""
    if axis_name == "auto":
        axis_name = data_parallel_axis()
    return models.SiameseNet(method=config.method, axis_name=axis_name,
                             conv=conv_lib.conv_for_backend(),
                             max_pool=conv_lib.max_pool_for_backend(),
                             **config.model)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                           ) -> optax.Schedule:
    """Cosine decay to 0 over the run, after an optional linear warm-up (SimSiam, paper 6.2)."""
    total_steps = config.num_epochs * steps_per_epoch
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    if not warmup_steps:
        return optax.cosine_decay_schedule(config.learning_rate, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (torch.optim.SGD semantics) on a cosine
    schedule; with config.fix_predictor_lr the predictor keeps the base rate (SimSiam Sec. 4.4)."""

    def sgd(learning_rate):
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(learning_rate, momentum=config.momentum))

    schedule = learning_rate_schedule(config, steps_per_epoch)
    if not config.fix_predictor_lr:
        return sgd(schedule)
    def labels(params):
        return traverse_util.path_aware_map(
            lambda path, _: "fixed" if path[0] == "predictor" else "scheduled", params)

    return optax.multi_transform(
        {"scheduled": sgd(schedule), "fixed": sgd(config.learning_rate)}, labels)


def view_shapes(config: ml_collections.ConfigDict, batch_size: int) -> list[tuple[int, ...]]:
    """Shapes (B, H, W, 3) of the multi-crop views: global crops first, then local crops."""
    return ([(batch_size, config.global_size, config.global_size, 3)] * config.global_crops
            + [(batch_size, config.local_size, config.local_size, 3)] * config.local_crops)


def create_train_state(rng: Array, config: ml_collections.ConfigDict, model: models.SiameseNet,
                       steps_per_epoch: int) -> TrainState:
    """Initialises parameters (on the host, unreplicated), BN statistics, optimiser and target."""
    views = [jnp.zeros(shape, jnp.float32) for shape in view_shapes(config, 2)[:1]]
    variables = jax.jit(functools.partial(model.init, method=models.SiameseNet.forward_views),
                        static_argnums=2)(rng, views, False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    target_variables = None
    if config.target == "ema":
        target_variables = {"params": params, "batch_stats": batch_stats}
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=make_optimizer(config, steps_per_epoch), batch_stats=batch_stats,
                             target_variables=target_variables)


def _global_norm(tree: Any) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def train_step(state: TrainState, batch: Sequence[Array], rng: Array, *,
               model: models.SiameseNet, config: ml_collections.ConfigDict,
               learning_rate_fn: optax.Schedule) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step on this device's shard of the views, inside pmap(axis_name=AXIS_NAME);
    gradients and metrics are averaged over `model.axis_name` (none: a single device).

    batch: the views (B_local, H, W, 3), global crops first. rng: this step's key, handed to the
    model as its "dropout" stream (the default model is deterministic). Returns the new state
    and metrics averaged over devices. If the loss or any gradient is not finite, the state is
    returned unchanged and metrics["finite"] is 0, so no NaN ever reaches the parameters.
    """

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, updates = model.apply(variables, list(batch), True, rngs={"dropout": rng},
                                       mutable=["batch_stats"],
                                       method=models.SiameseNet.forward_views)
        targets = models.target_projections(model, outputs, list(batch[:config.global_crops]),
                                            True, config.target, state.target_variables)
        loss, diagnostics = losses.ssl_loss(config.method, outputs, targets)
        return loss, (updates["batch_stats"], diagnostics)

    (loss, (batch_stats, diagnostics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    axis = model.axis_name
    if axis:
        grads = jax.lax.pmean(grads, axis)
    grad_norm = _global_norm(grads)
    metrics = {"loss": loss, **diagnostics}
    if axis:
        metrics = jax.lax.pmean(metrics, axis)
        if "kappa_min" in metrics:
            metrics.update(kappa_min=jax.lax.pmin(diagnostics["kappa_min"], axis),
                           kappa_max=jax.lax.pmax(diagnostics["kappa_max"], axis))
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply_update(state: TrainState) -> TrainState:
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        if config.target == "ema":
            new_state = new_state.replace(target_variables=models.ema_update(
                state.target_variables, {"params": new_state.params, "batch_stats": batch_stats},
                config.ema_decay))
        return new_state

    # A cond, not a select over the state: the update is written once, in place (the select
    # was 34 ms of a 1 s step at 64 px on the 2-core CPU, benchmarks.train_step --profile).
    new_state = jax.lax.cond(finite, apply_update, lambda state: state, state)
    metrics.update(grad_norm=grad_norm, learning_rate=learning_rate_fn(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics


def make_p_train_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                      steps_per_epoch: int):
    """train_step pmapped over local devices; the state argument is donated."""
    step = functools.partial(train_step, model=model, config=config,
                             learning_rate_fn=learning_rate_schedule(config, steps_per_epoch))
    return jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,))


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ValueError naming the first config field with an invalid value."""
    checks = [
        ("method", config.method in models.METHODS, f"one of {models.METHODS}"),
        ("target", config.target in models.TARGETS, f"one of {models.TARGETS}"),
        ("model.stem", config.model.stem in models.STEMS, f"one of {models.STEMS}"),
        ("model.kappa_map", config.model.kappa_map in models.KAPPA_MAPS,
         f"one of {models.KAPPA_MAPS}"),
        ("model.kappa_min", config.model.kappa_min >= 0, ">= 0"),
        ("learning_rate", config.learning_rate > 0, "positive"),
        ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("momentum", 0 <= config.momentum < 1, "in [0, 1)"),
        ("ema_decay", 0 <= config.ema_decay < 1, "in [0, 1)"),
        ("num_epochs", config.num_epochs > 0, "positive"),
        ("warmup_epochs", 0 <= config.warmup_epochs <= config.num_epochs,
         "in [0, num_epochs]"),
        ("global_crops", config.global_crops >= 1, ">= 1"),
        ("local_crops", config.local_crops >= 0, ">= 0"),
        ("global_crops", config.global_crops + config.local_crops >= 2,
         "with local_crops, at least 2 views"),
        ("batch_size", config.batch_size > 0 and config.batch_size % num_devices == 0,
         f"a positive multiple of the {num_devices} devices"),
        ("log_every_steps", config.log_every_steps > 0, "positive"),
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


def crops_config(config: ml_collections.ConfigDict) -> input_pipeline.MultiCropConfig:
    return input_pipeline.MultiCropConfig(
        n_global=config.global_crops, global_size=config.global_size,
        global_scale=tuple(config.global_scale), n_local=config.local_crops,
        local_size=config.local_size, local_scale=tuple(config.local_scale))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Pretrains on config.dataset; resumes from the newest checkpoint in workdir if any.

    Batches and step keys depend only on (seed, step), so a resumed run continues exactly as an
    uninterrupted one. Stops with FloatingPointError at the first non-finite step, after the
    last good checkpoint is safely on disk (the bad state is never saved). On SIGTERM it saves
    a checkpoint after the current step and raises Preempted.
    """
    validate_config(config, jax.device_count())
    _check_dataset_and_crops(config)
    _check_workdir(workdir)
    checkpoints.save_config(workdir, config)

    builder = datasets.prepare(config.dataset, data_dir=config.data_dir or None,
                               archive=config.archive or None)
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

    batches = input_pipeline.pretrain_dataset(
        examples, batch_size=config.batch_size, seed=config.seed, crops=crops_config(config),
        start_step=start_step, num_steps=total_steps - start_step)
    batches = jax_utils.prefetch_to_device(
        (batch["views"] for batch in batches.as_numpy_iterator()), 2)
    p_train_step = make_p_train_step(model, config, steps_per_epoch)
    state = jax_utils.replicate(state)
    writer = MetricWriter(workdir)
    progress = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                         disable=jax.process_index() != 0)
    preemption = _Preemption()
    pending: list[dict[str, float]] = []
    last_log = time.perf_counter()
    try:
        for step in range(start_step, total_steps):
            step_keys = jax.random.split(jax.random.fold_in(rng, step), jax.local_device_count())
            state, metrics = p_train_step(state, next(batches), step_keys)
            metrics = jax.device_get(_unreplicate(metrics))
            if not metrics.pop("finite"):
                raise FloatingPointError(
                    f"Non-finite loss or gradients at step {step} (loss={metrics['loss']}, "
                    f"grad_norm={metrics['grad_norm']}); stopping. The newest checkpoint in "
                    f"{checkpoint_manager.directory} predates it and is intact.")
            pending.append({k: float(v) for k, v in metrics.items()})
            progress.update()
            done = step + 1
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
