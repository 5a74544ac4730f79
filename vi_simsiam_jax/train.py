"""The pure, data-parallel pretraining step (paper Alg. 1; Eq. 1 for SimSiam, Eq. 12 for
VI-SimSiam). Imports no tensorflow: it runs wherever jax, flax and optax do.

The pretraining step `pretrain_step` is a function `(state, batch, rng) -> (state, metrics)` run
under `jax.pmap` over every local device (axis `train_state.AXIS_NAME`): it makes the views of
the batch's uint8 source images on the device (vi_simsiam_jax.augment), then takes `train_step`
on them. BatchNorm statistics are synchronised across devices through the model's `axis_name`
and gradients are averaged with `lax.pmean`, so one step on N devices equals one step on a
single device with the whole batch. The loop around it is `vi_simsiam_jax.loop`.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vi_simsiam_jax import augment, methods, models
from vi_simsiam_jax.train_state import (AXIS_NAME, TrainState, crops_config, ema_decay_schedule,
                                        learning_rate_schedule)

Array = jax.Array


def _global_norm(tree: Any) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def train_step(state: TrainState, batch: Sequence[Array], rng: Array, *,
               model: models.SiameseNet, method: str, global_crops: int, target: str,
               loss_reduction: str, ema_decay_fn: optax.Schedule,
               learning_rate_fn: optax.Schedule) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step on this device's shard of the views, inside pmap(axis_name=AXIS_NAME);
    gradients and metrics are averaged over `model.axis_name` (none: a single device).

    batch: the views (B_local, H, W, 3), the `global_crops` global crops first. rng: this step's
    key, handed to the model as its "dropout" stream (the default model is deterministic).
    method: a `methods.REGISTRY` name; target: "stopgrad" | "ema" (decay `ema_decay_fn(step)`),
    see `models.target_projections`; loss_reduction over the view pairs: "paper" | "mean" | "sum"
    (`methods.Method.loss_of`). Returns the new state and metrics averaged over devices.
    If the loss or any gradient is not finite, the state is returned unchanged and
    metrics["finite"] is 0, so no NaN ever reaches the parameters.
    """

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, updates = model.apply(variables, list(batch), True, rngs={"dropout": rng},
                                       mutable=["batch_stats"],
                                       method=models.SiameseNet.forward_views)
        targets = models.target_projections(model, outputs, list(batch[:global_crops]), True,
                                            target, state.target_variables)
        loss, diagnostics = methods.get(method).loss_of(outputs, targets, loss_reduction)
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
        if target == "ema":
            new_state = new_state.replace(target_variables=models.ema_update(
                state.target_variables, {"params": new_state.params, "batch_stats": batch_stats},
                ema_decay_fn(state.step)))
        return new_state

    # A cond, not a select over the state: the update is written once, in place.
    new_state = jax.lax.cond(finite, apply_update, lambda state: state, state)
    metrics.update(grad_norm=grad_norm, learning_rate=learning_rate_fn(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics


def pretrain_step(state: TrainState, batch: dict[str, Array], rng: Array, *,
                  crops: augment.MultiCropConfig,
                  **step_args) -> tuple[TrainState, dict[str, Array]]:
    """The pretraining step on source images: `augment.views` of the batch, then `train_step`.

    batch: "image" uint8 [B_local, H, W, 3], "size" int32 [B_local, 2], "position" int32
    [B_local] (input_pipeline.pretrain_batches). rng: the run's key, the same at every step and
    on every device: the views draw from (rng, stream position, view), and the model's key from
    (rng, step, device). step_args: those of `train_step` after `rng`.
    """
    view_key, model_key = jax.random.split(rng)
    views = augment.views(batch["image"], batch["size"], batch["position"], view_key, crops)
    model_key = jax.random.fold_in(model_key, state.step)
    axis = step_args["model"].axis_name
    if axis:
        model_key = jax.random.fold_in(model_key, jax.lax.axis_index(axis))
    return train_step(state, views, model_key, **step_args)


def _step_args(model: models.SiameseNet, config: ml_collections.ConfigDict,
               steps_per_epoch: int) -> dict[str, Any]:
    return dict(model=model, method=config.method, global_crops=config.global_crops,
                target=config.target, loss_reduction=config.loss_reduction,
                ema_decay_fn=ema_decay_schedule(config, steps_per_epoch),
                learning_rate_fn=learning_rate_schedule(config, steps_per_epoch))


def configured_train_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                          steps_per_epoch: int):
    """train_step with config's method, targets, loss reduction and schedules bound:
    (state, views, rng) -> (state, metrics)."""
    return functools.partial(train_step, **_step_args(model, config, steps_per_epoch))


def configured_pretrain_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                             steps_per_epoch: int):
    """pretrain_step with config's crops and `configured_train_step`'s arguments bound:
    (state, batch, rng) -> (state, metrics)."""
    return functools.partial(pretrain_step, crops=crops_config(config),
                             **_step_args(model, config, steps_per_epoch))


def make_p_train_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                      steps_per_epoch: int, *, augment_views: bool = True,
                      devices: Sequence[jax.Device] | None = None):
    """The pretraining step pmapped over `devices` (default: every local device), state
    donated: `pretrain_step` on source images, or with augment_views=False `train_step` on
    ready views."""
    step = (configured_pretrain_step if augment_views else configured_train_step)(
        model, config, steps_per_epoch)
    return jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,), devices=devices)
