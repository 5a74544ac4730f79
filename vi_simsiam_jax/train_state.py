"""The model, optimiser and train state a pretraining config describes: what training builds
(checkpoints hold a `TrainState`) and, of it, what evaluation restores (the model's variables)."""

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util
from flax.training import train_state

from vi_simsiam_jax import augment, methods, models
from vi_simsiam_jax.cpu import layers

AXIS_NAME = "batch"  # the pmapped step's device axis
EMA_SCHEDULES = ("cosine", "constant")
Array = jax.Array


class TrainState(train_state.TrainState):
    """params/opt_state/step from flax, plus BN statistics and the EMA target (BYOL only)."""

    batch_stats: Any
    target_variables: Any = None  # {"params", "batch_stats"} of the EMA target, or None


def data_parallel_axis() -> str | None:
    """AXIS_NAME when the step spans more than one device (on any host), else None: on a single
    device there is nothing to synchronise, and a model without an axis has no collectives for
    XLA to run (benchmarks/README.md)."""
    return AXIS_NAME if jax.device_count() > 1 else None


def make_model(config: ml_collections.ConfigDict, axis_name: str | None | Literal["auto"] = "auto",
               half_precision: bool | None = None) -> models.SiameseNet:
    """The SiameseNet described by config.method and config.model; its BatchNorms synchronise
    over `axis_name` ("auto": `data_parallel_axis()`; None: per-device statistics). Convolution
    and pooling come from `cpu.layers.select(config.conv)` (same parameters on every backend).

    half_precision (None: config.half_precision, False when absent): the model computes its
    convolutions and dense layers in bfloat16; its parameters and BatchNorm statistics are float32
    either way (`models.BatchNorm`, flax's param_dtype), so a checkpoint does not depend on it.
    """
    if axis_name == "auto":
        axis_name = data_parallel_axis()
    if half_precision is None:
        half_precision = config.get("half_precision", False)
    model_config = dict(config.model)
    if half_precision:
        if jnp.dtype(model_config.get("dtype", jnp.float32)) != jnp.float32:
            raise ValueError(f"config.half_precision computes in bfloat16; it cannot be combined "
                             f"with config.model.dtype={model_config['dtype']!r}.")
        model_config["dtype"] = jnp.bfloat16
    conv, max_pool = layers.select(config.get("conv", "auto"))
    return models.SiameseNet(kappa=methods.get(config.method).kappa, axis_name=axis_name,
                             conv=conv, max_pool=max_pool, **model_config)


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


def ema_decay_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                       ) -> optax.Schedule:
    """The target network's EMA decay at each step (BYOL / VI-BYOL, config.target="ema").

    "cosine" (default, BYOL Sec. 3.2): tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from
    tau_base = config.ema_decay at step 0 to 1 at the last step K. "constant": tau_base always.
    """
    if config.ema_schedule not in EMA_SCHEDULES:
        raise ValueError(f"config.ema_schedule must be one of {EMA_SCHEDULES}, got "
                         f"{config.ema_schedule!r}.")
    if config.ema_schedule == "constant":
        return optax.constant_schedule(config.ema_decay)
    gap = optax.cosine_decay_schedule(1.0 - config.ema_decay, config.num_epochs * steps_per_epoch)
    return lambda step: 1.0 - gap(step)


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
    variables = jax.jit(functools.partial(model.init, method=models.SiameseNet.forward_views),
                        static_argnums=2)(rng, views, False)
    storage = jnp.promote_types(jnp.float32, model.dtype)
    return jax.tree.map(lambda a: a.astype(storage), dict(variables))


def create_train_state(rng: Array, config: ml_collections.ConfigDict, model: models.SiameseNet,
                       steps_per_epoch: int) -> TrainState:
    """Initialises parameters and BN statistics (`init_variables`), optimiser and target."""
    variables = init_variables(rng, config, model)
    params, batch_stats = variables["params"], variables["batch_stats"]
    target_variables = None
    if config.target == "ema":
        target_variables = {"params": params, "batch_stats": batch_stats}
    return TrainState.create(apply_fn=model.apply, params=params,
                             tx=make_optimizer(config, steps_per_epoch), batch_stats=batch_stats,
                             target_variables=target_variables)


def abstract_variables(config: ml_collections.ConfigDict, model: models.SiameseNet
                       ) -> dict[str, Any]:
    """Shapes and dtypes of {"params", "batch_stats"}, without computing them: what evaluation
    restores from a checkpoint (no optimiser is built)."""
    return jax.eval_shape(lambda: init_variables(jax.random.key(0), config, model))


def abstract_train_state(config: ml_collections.ConfigDict, model: models.SiameseNet
                         ) -> TrainState:
    """Shapes and dtypes of the whole TrainState, without computing an initialisation."""
    return jax.eval_shape(lambda: create_train_state(jax.random.key(0), config, model, 1))
