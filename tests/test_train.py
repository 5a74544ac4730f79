"""The data-parallel training step: device-count invariance, finiteness guard, optimiser."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import tiny_config as tiny_config_file
from vi_simsiam_jax import train, train_state


def tiny_config(method: str = "vi_simsiam", target: str = "stopgrad"):
    config = tiny_config_file.get_config()
    config.method, config.target = method, target
    return config


def _views(config, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in train_state.view_shapes(config, batch_size)]


# The step in float64 (tests/float64.py): the claims here are about the math, and the tests that
# run a step share its few compiled programs (target x device count x axis).
pytestmark = pytest.mark.usefixtures("x64")


@functools.cache
def _initial_state(target: str = "stopgrad"):
    config = tiny_config(target=target)
    config.model.dtype = "float64"
    return train_state.create_train_state(jax.random.key(0), config,
                                         train_state.make_model(config))


@functools.cache
def _p_train_step(target: str, num_devices: int, axis_name: str | None):
    config = tiny_config(target=target)
    config.model.dtype = "float64"
    model = train_state.make_model(config, axis_name=axis_name)
    step = train.configured_train_step(model, config, 10)
    return jax.pmap(step, axis_name=train_state.AXIS_NAME,
                    devices=jax.local_devices()[:num_devices])


def _one_step(target, views, num_devices, axis_name=train_state.AXIS_NAME):
    """One pmapped VI-SimSiam step from the initial state on `num_devices` devices; returns the
    unreplicated state and metrics."""
    replicate = lambda tree: jax.tree.map(lambda x: np.stack([x] * num_devices), tree)
    shard = lambda v: v.reshape((num_devices, -1) + v.shape[1:])
    keys = jax.random.split(jax.random.key(1), num_devices)
    state, metrics = _p_train_step(target, num_devices, axis_name)(
        replicate(_initial_state(target)), [shard(v) for v in views], keys)
    return jax.tree.map(lambda x: np.asarray(x[0]), (state, metrics))


# Two float64 programs of the same step (8 devices vs 1, with or without the device axis) differ
# by roundoff in other summation orders: the float32 runs of these comparisons differ by up to
# ~1e3 eps32 relative (the loss: Power Spherical terms ~100x the sum, BatchNorm over 1-4
# examples per device), so the float64 runs by ~1e3 eps64 ~ 2e-13; 1e-10 keeps 500x of margin,
# while a wrong collective or a missing pmean changes the step by > 1e-3.
RTOL64, ATOL64 = 1e-10, 1e-12


def _assert_same_step(a, b, names, metrics):
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    assert int(state_a.step) == int(state_b.step) == 1
    for name in names:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL64, atol=ATOL64),
                     getattr(state_a, name), getattr(state_b, name))
    for name in metrics:
        np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=RTOL64, atol=ATOL64,
                                   err_msg=name)


@pytest.mark.parametrize("target", ["stopgrad", "ema"])
def test_eight_devices_equal_one_device(target):
    assert jax.local_device_count() == 8
    views = _views(tiny_config(target=target), batch_size=16)
    eight, one = _one_step(target, views, 8), _one_step(target, views, 1)
    # Of the metrics, those that do not depend on the split (z_std, kappa_std: per device).
    _assert_same_step(eight, one, ("params", "batch_stats", "target_variables"),
                      ("loss", "cosine", "kappa_mean", "kappa_min", "kappa_max", "grad_norm"))
    # The step really moved the parameters (otherwise the equality above proves nothing).
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one[0].params,
                         _initial_state(target).params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_ema_target_follows_the_scheduled_decay():
    """BYOL's cosine schedule from ema_decay to 1, and the first step's target update
    tau_0 * initial + (1 - tau_0) * updated."""
    config = tiny_config(target="ema")
    config.num_epochs, config.ema_decay = 2, 0.99
    hyper = train_state.hyperparameters(config, steps_per_epoch=5)
    np.testing.assert_allclose([train_state.ema_decay_at(hyper, k, "cosine") for k in (0, 5, 10)],
                               [0.99, 0.995, 1.0], atol=1e-7)
    assert float(train_state.ema_decay_at(hyper, 10, "constant")) == pytest.approx(0.99)
    initial = _initial_state("ema")
    state, _ = _one_step("ema", _views(tiny_config(target="ema"), 16), 1)
    tau = float(train_state.ema_decay_at(train_state.hyperparameters(tiny_config(target="ema"), 10),
                                         0, "cosine"))
    assert tau == pytest.approx(0.996)
    expected = jax.tree.map(lambda old, new: tau * old + (1 - tau) * new,
                            initial.target_variables["params"], state.params)
    # Each side rounds two products and a sum: <= 2 eps64 (|old| + |new|) ~ 4e-15 for the
    # parameters' magnitudes (< 10).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-14),
                 state.target_variables["params"], expected)


def test_single_device_step_without_collectives_equals_synchronised_step(monkeypatch):
    """On one device the model has no axis (no collectives in the step) and the step is the
    same as with the axis; with several devices the axis is kept."""
    assert train_state.make_model(tiny_config()).axis_name == train_state.AXIS_NAME  # 8 devices
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert train_state.data_parallel_axis() is None
    assert train_state.make_model(tiny_config()).axis_name is None
    views = _views(tiny_config(), batch_size=16)
    with_axis = _one_step("stopgrad", views, 1)
    without = _one_step("stopgrad", views, 1, axis_name=None)
    _assert_same_step(without, with_axis, ("params", "batch_stats", "opt_state"), with_axis[1])


def test_non_finite_step_leaves_state_unchanged():
    views = _views(tiny_config(), batch_size=16)
    views[0][3] = np.nan
    state, metrics = _one_step("stopgrad", views, 8)
    initial = _initial_state()
    assert float(metrics["finite"]) == 0.0 and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, state.params, initial.params)
    jax.tree.map(np.testing.assert_array_equal, state.batch_stats, initial.batch_stats)


def test_cosine_schedule_and_fixed_predictor_lr():
    config = tiny_config()
    config.num_epochs, config.learning_rate = 2, 0.5
    hyper = train_state.hyperparameters(config, steps_per_epoch=5)
    np.testing.assert_allclose([train_state.learning_rate_at(hyper, k) for k in (0, 5, 10)],
                               [0.5, 0.25, 0.0], atol=1e-7)
    config.fix_predictor_lr, config.weight_decay, config.momentum = True, 0.0, 0.0
    params = {"predictor": jnp.ones(2), "backbone": jnp.ones(2)}
    tx = train_state.make_optimizer(train_state.hyperparameters(config, 5), True)
    opt_state = tx.init(params)
    for _ in range(6):  # the step-5 update uses the decayed rate 0.25 for the backbone
        updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    np.testing.assert_allclose(updates["predictor"], -0.5)
    np.testing.assert_allclose(updates["backbone"], -0.25, rtol=1e-6)


@pytest.mark.parametrize("num_epochs,warmup_epochs", [(3, 0), (3, 1), (1, 1), (2, 0.5)])
def test_the_schedules_computed_at_run_time_are_optaxs(num_epochs, warmup_epochs):
    """learning_rate_at and ema_decay_at, their peak and lengths runtime values, against optax's
    schedules with the same numbers as constants, at every step and past the end (in float64, as
    every test here: the same formulas, so equal but for a last-bit rounding)."""
    config = tiny_config()
    config.update(num_epochs=num_epochs, warmup_epochs=warmup_epochs, learning_rate=0.3,
                  ema_decay=0.99)
    hyper = train_state.hyperparameters(config, steps_per_epoch=7)
    total, warmup = num_epochs * 7, int(warmup_epochs * 7)
    if warmup:
        expected = optax.warmup_cosine_decay_schedule(0.0, 0.3, warmup, max(total, warmup + 1))
    else:
        expected = optax.cosine_decay_schedule(0.3, total)
    gap = optax.cosine_decay_schedule(1 - 0.99, total)
    counts = jnp.arange(total + 3)
    np.testing.assert_allclose(jax.vmap(lambda k: train_state.learning_rate_at(hyper, k))(counts),
                               jax.vmap(expected)(counts), rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(
        jax.vmap(lambda k: train_state.ema_decay_at(hyper, k, "cosine"))(counts),
        1 - jax.vmap(gap)(counts), rtol=0, atol=1e-15)
