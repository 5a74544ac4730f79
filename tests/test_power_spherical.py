"""Power Spherical functions against tfp (float64), quadrature, Monte Carlo and closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_probability.substrates.numpy as tfp
from scipy import stats

from tests.reference import unit
from vi_simsiam_jax import power_spherical as ps

tfd = tfp.distributions

DIMS = (2, 3, 64, 2048, 4096)
KAPPAS = (0.0, 1e-3, 1.0, 100.0, 1e4, 1e6)


def _points(dim: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A random mu and x near mu, at random, and near -mu (float64)."""
    rng = np.random.default_rng(seed)
    mu = unit(rng.normal(size=dim))
    noise = rng.normal(size=dim)
    return mu, {
        "near_mu": unit(mu + 1e-3 * noise),
        "random": unit(noise),
        "near_minus_mu": unit(-mu + 1e-3 * noise),
    }


@pytest.mark.parametrize("dim", DIMS)
def test_matches_tfp_in_float64(dim):
    mu, xs = _points(dim, seed=dim)
    with jax.enable_x64(True):
        for kappa in KAPPAS:
            ref = tfd.PowerSpherical(mu, np.float64(kappa))
            log_c = float(ps.log_normalizer(kappa, dim))
            np.testing.assert_allclose(log_c, -ref._log_normalization(), rtol=1e-8, atol=1e-300)
            for name, x in xs.items():
                ours = float(ps.log_prob(x, mu, kappa))
                # Relative to the size of the terms that cancel in log C + kappa log(1 + mu.x).
                scale = abs(log_c) + kappa * abs(np.log1p(mu @ x))
                assert abs(ours - ref.log_prob(x)) <= 1e-8 * scale, (kappa, name)
            entropy = float(ps.entropy(mu, kappa))
            np.testing.assert_allclose(entropy, ref.entropy(), rtol=1e-8, atol=1e-8 * abs(log_c))
            kl = float(ps.kl_to_uniform(mu, kappa))
            kl_ref = tfd.kl_divergence(ref, tfd.SphericalUniform(dim, dtype=np.float64))
            np.testing.assert_allclose(kl, kl_ref, rtol=1e-8, atol=1e-8 * abs(log_c))
            np.testing.assert_allclose(ps.mean(mu, kappa), ref.mean(), rtol=1e-8, atol=1e-15)


@pytest.mark.parametrize("kappa", [0.0, 1.0, 10.0, 100.0])
def test_density_integrates_to_one_on_s2(kappa):
    # Gauss-Legendre in cos(theta) times the trapezoid rule in phi: exact area element on S^2.
    cos_theta, weights = np.polynomial.legendre.leggauss(600)
    phi = np.linspace(0.0, 2 * np.pi, 1200, endpoint=False)
    sin_theta = np.sqrt(1 - cos_theta**2)
    x = np.stack(np.broadcast_arrays(sin_theta[:, None] * np.cos(phi),
                                     sin_theta[:, None] * np.sin(phi),
                                     cos_theta[:, None]), axis=-1)
    mu = unit(np.array([0.3, -0.5, 0.2]))
    with jax.enable_x64(True):
        density = np.exp(ps.log_prob(x, mu, kappa))
    integral = np.sum(weights[:, None] * density) * (2 * np.pi / phi.size)
    np.testing.assert_allclose(integral, 1.0, rtol=1e-6)


@pytest.mark.parametrize("dim,kappa", [(3, 1.0), (64, 100.0), (2048, 1e4)])
def test_samples_unit_norm_mean_and_beta_marginal(dim, kappa):
    n = 20_000
    mu = jnp.asarray(unit(np.random.default_rng(dim).normal(size=dim)), jnp.float32)
    x = ps.sample(jax.random.key(0), mu, jnp.float32(kappa), (n,))
    assert x.shape == (n, dim) and x.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-6)
    # Sample mean within 5 standard errors of mean() in every coordinate.
    x64 = np.asarray(x, np.float64)
    std_err = x64.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(x64.mean(axis=0) - ps.mean(mu, kappa)) <= 5 * std_err + 1e-7)
    # (1 + mu.x) / 2 ~ Beta((d-1)/2 + kappa, (d-1)/2).
    b = (dim - 1) / 2
    u = (1 + x64 @ np.asarray(mu, np.float64)) / 2
    assert stats.kstest(u, stats.beta(b + kappa, b).cdf).pvalue > 1e-3


def test_samples_fail_ks_for_wrong_kappa():
    """The KS check above can fail: samples at kappa=10 are not Beta(b + 12, b)."""
    mu = jnp.asarray([0.0, 1.0, 0.0])
    x = np.asarray(ps.sample(jax.random.key(1), mu, jnp.float32(10.0), (20_000,)), np.float64)
    assert stats.kstest((1 + x[:, 1]) / 2, stats.beta(13.0, 1.0).cdf).pvalue < 1e-6


def _second_moment_quadratic(mu: jnp.ndarray, kappa: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """E[(c.x)^2] in closed form: E[xx^T] = E[t^2] mu mu^T + (1 - E[t^2]) / (d-1) (I - mu mu^T)."""
    dim = mu.shape[-1]
    a, b = (dim - 1) / 2 + kappa, (dim - 1) / 2
    mean_beta = a / (a + b)
    second_beta = a * (a + 1) / ((a + b) * (a + b + 1))
    t_sq = 4 * second_beta - 4 * mean_beta + 1
    c_mu = c @ mu
    return t_sq * c_mu**2 + (1 - t_sq) / (dim - 1) * (c @ c - c_mu**2)


@pytest.mark.parametrize("test_fn", ["linear", "quadratic"])
def test_reparameterized_gradient_matches_finite_difference(test_fn):
    dim, kappa, n = 5, 3.0, 400_000
    rng = np.random.default_rng(3)
    mu_raw = rng.normal(size=dim)
    c = rng.normal(size=dim)
    tangent = rng.normal(size=dim)

    def exact(mu_raw, kappa):
        mu = unit(mu_raw, jnp)
        if test_fn == "linear":
            return c @ ps.mean(mu, kappa)
        return _second_moment_quadratic(mu, kappa, c)

    def monte_carlo(mu_raw, kappa):
        x = ps.sample(jax.random.key(7), unit(mu_raw, jnp), kappa, (n,))
        return jnp.mean(x @ c if test_fn == "linear" else (x @ c) ** 2)

    with jax.enable_x64(True):
        mu_raw, c, tangent = map(jnp.asarray, (mu_raw, c, tangent))
        kappa = jnp.float64(kappa)
        grad_mu, grad_kappa = jax.jit(jax.grad(monte_carlo, argnums=(0, 1)))(mu_raw, kappa)
        eps = 1e-5
        fd_kappa = (exact(mu_raw, kappa + eps) - exact(mu_raw, kappa - eps)) / (2 * eps)
        fd_mu = (exact(mu_raw + eps * tangent, kappa)
                 - exact(mu_raw - eps * tangent, kappa)) / (2 * eps)
        # Monte Carlo error of 4e5 samples: a few 1e-3.
        np.testing.assert_allclose(grad_kappa, fd_kappa, atol=5e-3)
        np.testing.assert_allclose(grad_mu @ tangent, fd_mu, atol=2e-2 * (1 + abs(fd_mu)))
        assert abs(fd_kappa) > 2e-2  # the check has something to detect


EXTREME_DIMS = (2, 3, 64, 2048, 4096)
EXTREME_KAPPAS = (0.0, 1e-6, 1.0, 1e6)


@pytest.mark.parametrize("dim", EXTREME_DIMS)
def test_float32_extremes_are_finite(dim):
    e1 = jnp.zeros(dim, jnp.float32).at[0].set(1.0)
    rand = jnp.asarray(unit(np.random.default_rng(0).normal(size=dim)), jnp.float32)
    cases = {"mu=e1": e1, "mu=-e1": -e1, "mu random": rand}

    def log_prob_sum(x, mu, kappa):
        return jnp.sum(ps.log_prob(x, mu, kappa))

    def sample_sum(mu, kappa):
        return jnp.sum(ps.sample(jax.random.key(0), mu, kappa, (8,)) * jnp.arange(dim))

    log_prob_grad = jax.jit(jax.grad(log_prob_sum, argnums=(0, 1, 2)))
    sample_grad = jax.jit(jax.grad(sample_sum, argnums=(0, 1)))
    for (name, mu), kappa in itertools.product(cases.items(), EXTREME_KAPPAS):
        kappa = jnp.float32(kappa)
        for x in (mu, -mu):  # mu.x = +1 and -1
            values = [ps.log_prob(x, mu, kappa), *log_prob_grad(x, mu, kappa)]
            assert all(np.all(np.isfinite(v)) for v in values), (name, float(kappa))
        samples = ps.sample(jax.random.key(1), mu, kappa, (8,))
        values = [samples, ps.entropy(mu, kappa), ps.kl_to_uniform(mu, kappa),
                  ps.mean(mu, kappa), *sample_grad(mu, kappa)]
        assert all(np.all(np.isfinite(v)) for v in values), (name, float(kappa))
        np.testing.assert_allclose(np.linalg.norm(samples, axis=-1), 1.0, atol=1e-6)


def test_sample_at_e1_is_concentrated_at_e1():
    """The degenerate Householder case (mu = e1) gives samples around e1, not a reflection."""
    mu = jnp.zeros(16).at[0].set(1.0)
    x = ps.sample(jax.random.key(2), mu, jnp.float32(1e4), (100,))
    assert np.all(x[:, 0] > 0.99)
    near = jnp.asarray(unit(np.eye(16)[0] + 1e-5 * np.random.default_rng(0).normal(size=16)),
                       jnp.float32)
    x_near = ps.sample(jax.random.key(2), near, jnp.float32(1e6), (100,))
    assert np.all(x_near @ near > 0.999)


@pytest.mark.parametrize("dim", [3, 2048, 4096])
@pytest.mark.parametrize("where", ["near_mu", "random", "near_minus_mu"])
def test_float32_log_prob_accuracy(dim, where):
    mu64, xs = _points(dim, seed=dim + 1)
    mu32, x32 = jnp.asarray(mu64, jnp.float32), jnp.asarray(xs[where], jnp.float32)
    for kappa in (0.0, 1e-3, 1.0, 100.0, 1e4, 1e6):
        ours = float(ps.log_prob(x32, mu32, jnp.float32(kappa)))
        # Exact value for the same float32 inputs, via tfp in float64.
        mu, x = np.asarray(mu32, np.float64), np.asarray(x32, np.float64)
        mu, x = unit(mu), unit(x)
        exact = tfd.PowerSpherical(mu, np.float64(kappa)).log_prob(x)
        scale = abs(tfd.PowerSpherical(mu, np.float64(kappa))._log_normalization())
        scale += kappa * abs(np.log1p(mu @ x))
        assert abs(ours - exact) <= 1e-5 * scale, (kappa, ours, exact)


def test_near_antipode_uses_stable_one_plus_cosine():
    """At mu.x = -1 + 1e-6 a naive 1 + mu.x in float32 loses most digits; ours does not."""
    angle = np.pi - 1.4142135e-3  # 1 + cos = 1e-6
    mu = jnp.asarray([1.0, 0.0], jnp.float32)
    x = jnp.asarray([np.cos(angle), np.sin(angle)], jnp.float32)
    kappa = jnp.float32(1e4)
    log_unnormalized = ps.log_prob(x, mu, kappa) - ps.log_normalizer(kappa, 2)
    exact = 1e4 * np.log1p(np.cos(np.float64(angle)))
    np.testing.assert_allclose(log_unnormalized, exact, rtol=1e-5)


def test_shapes_broadcast_like_numpy():
    mu = unit(np.random.default_rng(0).normal(size=(4, 8))).astype(np.float32)
    kappa = np.arange(4.0, dtype=np.float32)
    x = unit(np.random.default_rng(1).normal(size=(3, 1, 8))).astype(np.float32)
    assert ps.log_prob(x, mu, kappa).shape == (3, 4)
    assert ps.log_prob(x[:, 0], mu[0], kappa[0]).shape == (3,)
    assert ps.log_prob(x[:, None, 0], mu, 2.0).shape == (3, 4)  # scalar kappa
    assert ps.sample(jax.random.key(0), mu, kappa, (5, 2)).shape == (5, 2, 4, 8)
    assert ps.entropy(mu, kappa).shape == ps.kl_to_uniform(mu, 1.0).shape == (4,)
    assert ps.mean(mu, kappa).shape == (4, 8)
    batched = jax.vmap(ps.log_prob, in_axes=(0, 0, 0))(x[0].repeat(4, 0), mu, kappa)
    np.testing.assert_allclose(batched, ps.log_prob(x[0], mu, kappa), rtol=1e-6)


@pytest.mark.parametrize("kappa_shape", [(4, 1), (3,), (2, 4)])
def test_kappa_shape_mismatch_raises(kappa_shape):
    mu = jnp.ones((4, 8)) / jnp.sqrt(8.0)
    kappa = jnp.ones(kappa_shape)
    for fn in (lambda: ps.log_prob(mu, mu, kappa), lambda: ps.entropy(mu, kappa),
               lambda: ps.sample(jax.random.key(0), mu, kappa), lambda: ps.mean(mu, kappa)):
        with pytest.raises(ValueError, match="kappa must have mu's batch shape"):
            fn()


def test_event_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        ps.log_prob(jnp.ones((4, 7)), jnp.ones((4, 8)), jnp.ones(4))
    with pytest.raises(ValueError, match="d >= 2"):
        ps.log_prob(jnp.ones((4, 1)), jnp.ones((4, 1)), jnp.ones(4))


def test_dataclass_is_a_pytree_that_calls_the_functions():
    mu = jnp.asarray(unit(np.random.default_rng(0).normal(size=(2, 5))), jnp.float32)
    kappa = jnp.asarray([1.0, 7.0])
    dist = ps.PowerSpherical(mu, kappa)
    x = jax.jit(lambda d: d.sample(jax.random.key(0), (3,)))(dist)
    # jit fuses differently from eager execution: equal up to float32 rounding.
    np.testing.assert_allclose(x, ps.sample(jax.random.key(0), mu, kappa, (3,)), atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda d, x: d.log_prob(x))(dist, x),
                               ps.log_prob(x, mu, kappa), rtol=1e-6)
    np.testing.assert_array_equal(dist.entropy(), ps.entropy(mu, kappa))
    np.testing.assert_array_equal(dist.kl_to_uniform(), ps.kl_to_uniform(mu, kappa))
    np.testing.assert_array_equal(dist.mean(), ps.mean(mu, kappa))
    np.testing.assert_array_equal(dist.log_normalizer(), ps.log_normalizer(kappa, 5))
