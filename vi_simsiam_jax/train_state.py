"""The model, optimiser and train state a pretraining config describes: what training builds
(checkpoints hold a `TrainState`) and, of it, what evaluation restores (the model's variables)."""

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct, traverse_util

from vi_simsiam_jax import augment, backends, methods, models

AXIS_NAME = "batch"  # the pmapped step's device axis
EMA_SCHEDULES = ("cosine", "constant")
Array = jax.Array


class TrainState(struct.PyTreeNode):
    """What a checkpoint holds: step, parameters, SGD momentum, BatchNorm statistics and the EMA
    target (BYOL only). The optimiser is not part of it: the step builds it from the run's
    `Hyperparameters` (`make_optimizer`), so the state's structure, and with it the compiled
    step, is the same for every run of one model."""

    step: Array
    params: Any
    opt_state: Any
    batch_stats: Any
    target_variables: Any = None  # {"params", "batch_stats"} of the EMA target, or None


class Hyperparameters(struct.PyTreeNode):
    """The values of a run the step reads at run time rather than as constants of its program:
    the config fields that may change on resume (`config_schema.ALLOWED`) and the
    schedules' lengths. Every run of one method and model shape thus shares one compiled step.
    Scalars of JAX's default float (float32, a step count exact up to 2**24; float64 with
    jax_enable_x64, as the tests' float64 steps use)."""

    learning_rate: Array  # the schedule's peak
    weight_decay: Array
    momentum: Array
    total_steps: Array
    warmup_steps: Array
    ema_decay: Array  # the EMA schedule's base tau (BYOL)
    ema_gap: Array  # 1 - ema_decay, rounded once from float64 as optax's schedule takes it


def hyperparameters(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Hyperparameters:
    """The run's `Hyperparameters`: config's values, its schedules' lengths in steps."""
    values = dict(learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                  momentum=config.momentum, total_steps=config.num_epochs * steps_per_epoch,
                  warmup_steps=int(config.warmup_epochs * steps_per_epoch),
                  ema_decay=config.ema_decay, ema_gap=1.0 - config.ema_decay)
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    return Hyperparameters(**{k: np.asarray(v, dtype) for k, v in values.items()})


def data_parallel_axis() -> str | None:
    """AXIS_NAME when the step spans more than one device (on any host), else None: on a single
    device there is nothing to synchronise, and a model without an axis has no collectives for
    XLA to run (benchmarks/README.md)."""
    return AXIS_NAME if jax.device_count() > 1 else None


def make_model(config: ml_collections.ConfigDict, axis_name: str | None | Literal["auto"] = "auto",
               half_precision: bool | None = None) -> models.SiameseNet:
    """The SiameseNet described by config.method and config.model; its BatchNorms synchronise
    over `axis_name` ("auto": `data_parallel_axis()`; None: per-device statistics). Convolution
    and pooling come from `backends.select(config.conv)` (same parameters on every backend).

    half_precision (None: config.half_precision): the model computes its convolutions and dense
    layers in bfloat16; its parameters and BatchNorm statistics are float32 either way
    (`models.BatchNorm`, flax's param_dtype), so a checkpoint does not depend on it.
    """
    if axis_name == "auto":
        axis_name = data_parallel_axis()
    if half_precision is None:
        half_precision = config.half_precision
    model_config = dict(config.model)
    if half_precision:
        if jnp.dtype(model_config.get("dtype", jnp.float32)) != jnp.float32:
            raise ValueError(f"config.half_precision computes in bfloat16; it cannot be combined "
                             f"with config.model.dtype={model_config['dtype']!r}.")
        model_config["dtype"] = jnp.bfloat16
    conv, max_pool = backends.select(config.conv)
    return models.SiameseNet(kappa=methods.get(config.method).kappa, axis_name=axis_name,
                             conv=conv, max_pool=max_pool, **model_config)


def _cosine_decay(init_value: Array, decay_steps: Array, count: Array) -> Array:
    """optax.cosine_decay_schedule's value at `count`, its length a runtime value."""
    count = jnp.minimum(count, decay_steps)
    return init_value * (0.5 * (1 + jnp.cos(jnp.pi * count / decay_steps)))


def learning_rate_at(hyper: Hyperparameters, count: Array) -> Array:
    """Cosine decay to 0 over the run, after an optional linear warm-up (SimSiam, paper 6.2): the
    value of optax.warmup_cosine_decay_schedule (optax.cosine_decay_schedule without warm-up)."""
    count = jnp.asarray(count, hyper.total_steps.dtype)
    warmup = hyper.warmup_steps
    # optax.linear_schedule from 0 to the peak, written as optax computes it.
    warming = (-hyper.learning_rate * (1 - jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1))
               + hyper.learning_rate)
    decaying = _cosine_decay(hyper.learning_rate,
                             jnp.maximum(hyper.total_steps, warmup + 1) - warmup, count - warmup)
    return jnp.where(count < warmup, warming, decaying)


def ema_decay_at(hyper: Hyperparameters, count: Array, schedule: str) -> Array:
    """The target network's EMA decay at step `count` (BYOL / VI-BYOL, config.target="ema").

    "cosine" (default, BYOL Sec. 3.2): tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from
    tau_base = config.ema_decay at step 0 to 1 at the last step K. "constant": tau_base always.
    """
    assert schedule in EMA_SCHEDULES, schedule  # config_schema checks the config's value
    if schedule == "constant":
        return hyper.ema_decay
    return 1.0 - _cosine_decay(hyper.ema_gap, hyper.total_steps, count)


def make_optimizer(hyper: Hyperparameters, fix_predictor_lr: bool
                   ) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (torch.optim.SGD semantics) on the cosine
    schedule `learning_rate_at`; with fix_predictor_lr the predictor keeps the peak rate (SimSiam
    Sec. 4.4). Its state's structure does not depend on `hyper`."""

    def sgd(learning_rate):
        return optax.chain(optax.add_decayed_weights(hyper.weight_decay),
                           optax.sgd(learning_rate, momentum=hyper.momentum))

    schedule = functools.partial(learning_rate_at, hyper)
    if not fix_predictor_lr:
        return sgd(schedule)

    def labels(params):
        return traverse_util.path_aware_map(
            lambda path, _: "fixed" if path[0] == "predictor" else "scheduled", params)

    return optax.multi_transform(
        {"scheduled": sgd(schedule), "fixed": sgd(hyper.learning_rate)}, labels)


def crops_config(config: ml_collections.ConfigDict) -> augment.MultiCropConfig:
    """The multi-crop views a pretraining config asks for."""
    return augment.MultiCropConfig(
        n_global=config.global_crops, global_size=config.global_size,
        global_scale=tuple(config.global_scale), n_local=config.local_crops,
        local_size=config.local_size, local_scale=tuple(config.local_scale),
        blur_relative=config.blur_relative)


def view_shapes(config: ml_collections.ConfigDict, batch_size: int) -> list[tuple[int, ...]]:
    """Shapes (B, H, W, 3) of the multi-crop views: global crops first, then local crops."""
    return [(batch_size, size, size, 3) for size, _ in crops_config(config).views()]


def init_variables(rng: Array, config: ml_collections.ConfigDict, model: models.SiameseNet
                   ) -> dict[str, Any]:
    """The model's initial {"params", "batch_stats"} (on the host, unreplicated).

    They are float32, or float64 when the model computes in float64 (`dtype` in config.model,
    as the tests' tiny config has, with jax_enable_x64): a step without float32 rounding, with
    which the tests check that two programs (one process or several) compute the same step."""
    views = [jnp.zeros(shape, jnp.float32) for shape in view_shapes(config, 2)[:1]]
    variables = _jitted_init(model)(rng, views, False)
    storage = jnp.promote_types(jnp.float32, model.dtype)
    return jax.tree.map(lambda a: a.astype(storage), dict(variables))


@functools.cache
def _jitted_init(model: models.SiameseNet):
    """model.init over a list of views, jitted once per model: the runs and restores of a process
    that build equal models share one trace."""
    return jax.jit(functools.partial(model.init, method=models.SiameseNet.forward_views),
                   static_argnums=2)


def create_train_state(rng: Array, config: ml_collections.ConfigDict, model: models.SiameseNet
                       ) -> TrainState:
    """Initialises parameters and BN statistics (`init_variables`), optimiser and target."""
    variables = init_variables(rng, config, model)
    params, batch_stats = variables["params"], variables["batch_stats"]
    target_variables = None
    if config.target == "ema":
        target_variables = {"params": params, "batch_stats": batch_stats}
    # The optimiser state's structure is the same for any hyperparameters.
    tx = make_optimizer(hyperparameters(config, 1), config.fix_predictor_lr)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=batch_stats, target_variables=target_variables)


def abstract_variables(config: ml_collections.ConfigDict, model: models.SiameseNet
                       ) -> dict[str, Any]:
    """Shapes and dtypes of {"params", "batch_stats"}, without computing them: what evaluation
    restores from a checkpoint (no optimiser is built)."""
    return jax.eval_shape(lambda: init_variables(jax.random.key(0), config, model))


def abstract_train_state(config: ml_collections.ConfigDict, model: models.SiameseNet
                         ) -> TrainState:
    """Shapes and dtypes of the whole TrainState, without computing an initialisation."""
    return jax.eval_shape(lambda: create_train_state(jax.random.key(0), config, model))
