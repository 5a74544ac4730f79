"""config.half_precision: convolutions and dense layers in bfloat16; parameters, optimiser state,
BatchNorm statistics, the Power Spherical terms and the losses in float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tiny_config
from vi_simsiam_jax import checkpoints, models, power_spherical, train, train_state

STEPS = 30
# bfloat16's unit roundoff (8 significand bits): each convolution and dense output is rounded
# to it.
U_BF16 = float(jnp.finfo(jnp.bfloat16).eps) / 2
# A trajectory of 30 steps may leave the float32 one by TOLERANCE (relative for the loss and
# kappa, absolute for the cosine). At step 0 (same parameters) the two differ by the forward
# pass's roundoff, about U_BF16; afterwards the training dynamics amplify any perturbation, a
# float32 run whose inputs carry one bfloat16 rounding as much as bfloat16
# (`test_float32_with_rounded_inputs_stays_in_the_same_band`). At the learning rate below both
# stay within 4 U_BF16; at the tiny config's own (100x higher) such trajectories part within a
# few steps. Both runs must lower the loss by more than 5 bands, so a bfloat16 step that learned
# less or otherwise fails the test.
TOLERANCE = 4 * U_BF16
LEARNING_RATE = 1e-4


def _config(half_precision: bool):
    config = tiny_config.get_config()
    config.half_precision = half_precision
    config.learning_rate = LEARNING_RATE
    return config


def _batch(config) -> list[np.ndarray]:
    """One fixed batch of views (the same every step: the loss is one objective, and falls)."""
    rng = np.random.default_rng(0)
    return [rng.normal(size=shape).astype(np.float32)
            for shape in train_state.view_shapes(config, config.batch_size)]


@functools.cache
def _step(half_precision: bool):
    """(model, jitted single-device step) of the test config."""
    config = _config(half_precision)
    model = train_state.make_model(config, axis_name=None)
    return model, jax.jit(train.configured_train_step(model, config, STEPS))


@functools.cache
def _trajectory(half_precision: bool, round_inputs: bool = False):
    """(per-step metrics, final state) of STEPS steps from the seed-0 initial state."""
    config = _config(half_precision)
    model, step = _step(half_precision)
    state = train_state.create_train_state(jax.random.key(0), config, model)
    views = _batch(config)
    if round_inputs:
        views = [np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for v in views]
    metrics = []
    for i in range(STEPS):
        state, step_metrics = step(state, views, jax.random.key(i))
        metrics.append(jax.tree.map(float, step_metrics))
    return metrics, state


def _assert_in_band(reference, other):
    for i, (a, b) in enumerate(zip(reference, other)):
        assert b["finite"] == 1.0 and all(np.isfinite(list(b.values()))), (i, b)
        assert abs(b["loss"] - a["loss"]) <= TOLERANCE * abs(a["loss"]), (i, a["loss"], b["loss"])
        assert abs(b["cosine"] - a["cosine"]) <= TOLERANCE, (i, a["cosine"], b["cosine"])
        assert abs(b["kappa_mean"] - a["kappa_mean"]) <= TOLERANCE * a["kappa_mean"], i


def test_same_initial_state_whatever_the_precision():
    """Parameters are float32 in both precisions and drawn alike; the state's shapes and dtypes
    (what a checkpoint holds) do not depend on the switch."""
    states = [train_state.create_train_state(
        jax.random.key(0), _config(hp), train_state.make_model(_config(hp), axis_name=None))
        for hp in (False, True)]
    jax.tree.map(np.testing.assert_array_equal, states[0].params, states[1].params)
    abstract = [train_state.abstract_train_state(_config(hp), train_state.make_model(_config(hp)))
                for hp in (False, True)]
    saved = [[(jax.tree_util.keystr(path), leaf.shape, leaf.dtype)
              for path, leaf in jax.tree_util.tree_leaves_with_path(state)] for state in abstract]
    assert saved[0] == saved[1]
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract[1].params)} == {np.dtype(np.float32)}


def test_bfloat16_trajectory_stays_close_to_float32():
    reference, _ = _trajectory(False)
    half, _ = _trajectory(True)
    _assert_in_band(reference, half)
    for metrics in (reference, half):  # both learn, by more than the band
        assert metrics[-1]["loss"] < (1 - 5 * TOLERANCE) * metrics[0]["loss"]


def test_float32_with_rounded_inputs_stays_in_the_same_band():
    """The band's premise: the float32 dynamics move a trajectory whose inputs carry one
    bfloat16 rounding by about as much as bfloat16 does."""
    _assert_in_band(_trajectory(False)[0], _trajectory(False, round_inputs=True)[0])


def test_model_computes_in_bfloat16_and_the_loss_in_float32(monkeypatch):
    """The Power Spherical log-density receives float32 (Eq. 12 in float32), the backbone's
    features are bfloat16, and the stepped state stays float32."""
    received = []

    def recording_log_prob(x, mu, kappa):
        received.append({x.dtype, mu.dtype, kappa.dtype})
        return log_prob(x, mu, kappa)

    log_prob = power_spherical.log_prob
    monkeypatch.setattr(power_spherical, "log_prob", recording_log_prob)
    config = _config(half_precision=True)
    model = train_state.make_model(config, axis_name=None)
    state = train_state.abstract_train_state(config, model)
    views = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in _batch(config)]
    new_state, _ = jax.eval_shape(train.configured_train_step(model, config, STEPS), state, views,
                                  jax.random.key(0))
    assert received and all(dtypes == {np.dtype(np.float32)} for dtypes in received)
    assert jax.tree.leaves(new_state) == jax.tree.leaves(state)

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x, False,
                                                      method=models.SiameseNet.forward_views),
                             variables, views)
    assert {o.features.dtype for o in outputs} == {jnp.dtype(jnp.bfloat16)}
    float32 = np.dtype(np.float32)
    assert {(o.z.dtype, o.mu.dtype, o.kappa.dtype) for o in outputs} == {(float32,) * 3}


def test_float32_checkpoint_resumes_in_bfloat16(tmp_path):
    """A run may switch precision on resume: the float32 run's checkpoint restores into the
    bfloat16 run's state unchanged, and training continues from it."""
    _, state = _trajectory(False)
    manager = checkpoints.manager(str(tmp_path), _config(False))
    checkpoints.save(manager, STEPS, jax.device_get(state))
    config = _config(half_precision=True)
    model, step = _step(half_precision=True)
    restored = checkpoints.restore_latest(manager, train_state.abstract_train_state(config, model))
    manager.close()
    for name in ("step", "params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(restored, name),
                     jax.device_get(getattr(state, name)))
    _, metrics = step(restored, _batch(config), jax.random.key(0))
    assert float(metrics["finite"]) == 1.0


def test_half_precision_rejects_another_model_dtype():
    config = _config(half_precision=True)
    config.model.dtype = "float64"
    with pytest.raises(ValueError, match="half_precision"):
        train_state.make_model(config)


def test_batch_norm_input_gradient_is_rounded_to_bfloat16_once(x64):
    """With an upstream gradient almost in span{1, x_hat} (what normalising removes), BatchNorm's
    gradient for its input is a small difference of large parts. They are summed in float32 and
    the result is rounded to the bfloat16 input once, so its error stays within a roundoff of it;
    rounding the parts first would multiply the error by the cancellation (~100 here)."""
    rng = np.random.default_rng(0)
    x = np.asarray(jnp.asarray(rng.normal(size=(16, 32)) * 3 + 5, jnp.bfloat16), np.float64)
    x_hat = (x - x.mean(0)) / x.std(0)
    upstream = 1 + 2 * x_hat + 0.01 * rng.normal(size=x.shape)
    norm = models.BatchNorm(use_running_average=False, dtype=jnp.float64)
    variables = norm.init(jax.random.key(0), x)

    def input_gradient(x):
        return jax.grad(lambda x: jnp.sum(
            upstream * norm.apply(variables, x, mutable=["batch_stats"])[0]))(x)

    exact = np.asarray(input_gradient(jnp.asarray(x)))
    half = np.asarray(input_gradient(jnp.asarray(x, jnp.bfloat16)), np.float64)
    assert np.linalg.norm(half - exact) <= 2 * U_BF16 * np.linalg.norm(exact)
