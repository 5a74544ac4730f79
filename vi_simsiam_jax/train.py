"""The pure, data-parallel pretraining step (paper Alg. 1; Eq. 1 for SimSiam, Eq. 12 for
VI-SimSiam). Imports no tensorflow: it runs wherever jax, flax and optax do.

The pretraining step `pretrain_step` is a function `(state, batch, rng, hyper) -> (state,
metrics)` run under `jax.pmap` over every local device (axis `train_state.AXIS_NAME`): it makes
the views of the batch's uint8 source images on the device (vi_simsiam_jax.augment), then takes
`train_step` on them. BatchNorm statistics are synchronised across devices through the model's
`axis_name` and gradients are averaged with `lax.pmean`, so one step on N devices equals one
step on a single device with the whole batch. The loop around it is `vi_simsiam_jax.loop`.
"""

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vi_simsiam_jax import augment, methods, models
from vi_simsiam_jax.train_state import (AXIS_NAME, Hyperparameters, TrainState, crops_config,
                                        ema_decay_at, hyperparameters, learning_rate_at,
                                        make_optimizer)

Array = jax.Array


def _global_norm(tree: Any) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What shapes the step's program, read from a pretraining config (`step_config`). Runs with
    equal StepConfigs share one compiled step (`make_p_train_step`): what differs between them
    (learning rate, weight decay, momentum, schedule lengths) is the step's
    `train_state.Hyperparameters` input."""

    model: models.SiameseNet
    method: methods.Method
    crops: augment.MultiCropConfig
    target: str
    loss_reduction: str
    ema_schedule: str
    fix_predictor_lr: bool


def step_config(model: models.SiameseNet, config: ml_collections.ConfigDict) -> StepConfig:
    return StepConfig(model=model, method=methods.get(config.method), crops=crops_config(config),
                      target=config.target, loss_reduction=config.loss_reduction,
                      ema_schedule=config.ema_schedule, fix_predictor_lr=config.fix_predictor_lr)


def train_step(state: TrainState, batch: Sequence[Array], rng: Array, hyper: Hyperparameters, *,
               spec: StepConfig) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step on this device's shard of the views, inside pmap(axis_name=AXIS_NAME);
    gradients and metrics are averaged over `spec.model.axis_name` (none: a single device).

    batch: the views (B_local, H, W, 3), the `spec.crops.n_global` global crops first. rng: this
    step's key, handed to the model as its "dropout" stream (the default model is
    deterministic). spec.target: "stopgrad" | "ema" (decay `train_state.ema_decay_at`), see
    `models.target_projections`; spec.loss_reduction over the view pairs: "paper" | "mean" |
    "sum" (`methods.Method.loss_of`). Returns the new state and metrics averaged over devices.
    If the loss or any gradient is not finite, the state is returned unchanged and
    metrics["finite"] is 0, so no NaN ever reaches the parameters.
    """
    model, num_global = spec.model, spec.crops.n_global

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, updates = model.apply(variables, list(batch), True, rngs={"dropout": rng},
                                       mutable=["batch_stats"],
                                       method=models.SiameseNet.forward_views)
        targets = models.target_projections(model, outputs, list(batch[:num_global]), True,
                                            spec.target, state.target_variables)
        loss, diagnostics = spec.method.loss_of(outputs, targets, spec.loss_reduction)
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
        tx = make_optimizer(hyper, spec.fix_predictor_lr)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                  params=optax.apply_updates(state.params, updates),
                                  batch_stats=batch_stats)
        if spec.target == "ema":
            new_state = new_state.replace(target_variables=models.ema_update(
                state.target_variables, {"params": new_state.params, "batch_stats": batch_stats},
                ema_decay_at(hyper, state.step, spec.ema_schedule)))
        return new_state

    # A cond, not a select over the state: the update is written once, in place.
    new_state = jax.lax.cond(finite, apply_update, lambda state: state, state)
    metrics.update(grad_norm=grad_norm, learning_rate=learning_rate_at(hyper, state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics


def pretrain_step(state: TrainState, batch: dict[str, Array], rng: Array, hyper: Hyperparameters,
                  *, spec: StepConfig) -> tuple[TrainState, dict[str, Array]]:
    """The pretraining step on source images: `augment.views` of the batch, then `train_step`.

    batch: "image" uint8 [B_local, H, W, 3], "size" int32 [B_local, 2], "position" int32
    [B_local] (input_pipeline.pretrain_batches). rng: the run's key, the same at every step and
    on every device: the views draw from (rng, stream position, view), and the model's key from
    (rng, step, device).
    """
    view_key, model_key = jax.random.split(rng)
    views = augment.views(batch["image"], batch["size"], batch["position"], view_key, spec.crops)
    model_key = jax.random.fold_in(model_key, state.step)
    axis = spec.model.axis_name
    if axis:
        model_key = jax.random.fold_in(model_key, jax.lax.axis_index(axis))
    return train_step(state, views, model_key, hyper, spec=spec)


def configured_train_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                          steps_per_epoch: int):
    """train_step with config's step and hyperparameters bound: (state, views, rng) ->
    (state, metrics)."""
    return functools.partial(train_step, hyper=hyperparameters(config, steps_per_epoch),
                             spec=step_config(model, config))


def configured_pretrain_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                             steps_per_epoch: int):
    """pretrain_step with config's step and hyperparameters bound: (state, batch, rng) ->
    (state, metrics)."""
    return functools.partial(pretrain_step, hyper=hyperparameters(config, steps_per_epoch),
                             spec=step_config(model, config))


def make_p_train_step(model: models.SiameseNet, config: ml_collections.ConfigDict, *,
                      augment_views: bool = True,
                      devices: Sequence[jax.Device] | None = None):
    """The pretraining step pmapped over `devices` (default: every local device), state donated:
    (state, batch, rng, hyper) -> (state, metrics), `hyper` (`train_state.hyperparameters`) the
    same on every device. `pretrain_step` on source images, or with augment_views=False
    `train_step` on ready views. One function per (StepConfig, augment_views, devices), so the
    runs of a process that differ only in hyperparameters share its compiled program."""
    return _p_train_step(step_config(model, config), augment_views,
                         None if devices is None else tuple(devices))


@functools.cache
def _p_train_step(spec: StepConfig, augment_views: bool,
                  devices: tuple[jax.Device, ...] | None):
    step = pretrain_step if augment_views else train_step
    return jax.pmap(functools.partial(step, spec=spec), axis_name=AXIS_NAME,
                    in_axes=(0, 0, 0, None), donate_argnums=(0,), devices=devices)
