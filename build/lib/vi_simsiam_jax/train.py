"""The pure, data-parallel pretraining step (paper Alg. 1; Eq. 1 for SimSiam, Eq. 12 for
VI-SimSiam). Imports no tensorflow: it runs wherever jax, flax and optax do.

The step is a function `(state, batch, rng) -> (state, metrics)` run under `jax.pmap` over every
local device (axis `train_state.AXIS_NAME`): BatchNorm statistics are synchronised across
devices through the model's `axis_name` and gradients are averaged with `lax.pmean`, so one step
on N devices equals one step on a single device with the whole batch. The loop around it is
`vi_simsiam_jax.loop`.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vi_simsiam_jax import losses, models
from vi_simsiam_jax.train_state import (AXIS_NAME, TrainState, ema_decay_schedule,
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
    method: "simsiam" | "vi_simsiam"; target: "stopgrad" | "ema" (decay `ema_decay_fn(step)`),
    see `models.target_projections`; loss_reduction over the view pairs: "paper" | "mean" | "sum"
    (`losses.ssl_loss`). Returns the new state and metrics averaged over devices.
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
        loss, diagnostics = losses.ssl_loss(method, outputs, targets, loss_reduction)
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


def configured_train_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                          steps_per_epoch: int):
    """train_step with config's method, targets, loss reduction and schedules bound:
    (state, batch, rng) -> (state, metrics)."""
    return functools.partial(train_step, model=model, method=config.method,
                             global_crops=config.global_crops, target=config.target,
                             loss_reduction=config.loss_reduction,
                             ema_decay_fn=ema_decay_schedule(config, steps_per_epoch),
                             learning_rate_fn=learning_rate_schedule(config, steps_per_epoch))


def make_p_train_step(model: models.SiameseNet, config: ml_collections.ConfigDict,
                      steps_per_epoch: int):
    """`configured_train_step` pmapped over local devices; the state argument is donated."""
    return jax.pmap(configured_train_step(model, config, steps_per_epoch), axis_name=AXIS_NAME,
                    donate_argnums=(0,))
