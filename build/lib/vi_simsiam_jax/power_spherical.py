"""The Power Spherical distribution PS(mu, kappa) on the unit sphere S^{d-1}.

    PS(x; mu, kappa) = C(kappa, d) (1 + mu^T x)^kappa                    (paper Eq. 11)
    C(kappa, d)^{-1} = 2^{a+b} pi^b Gamma(a) / Gamma(a + b),  a = (d-1)/2 + kappa, b = (d-1)/2

(De Cao & Aziz 2020). Pure functions: jittable, vmappable and differentiable in mu and kappa;
`l2_normalize` projects onto the sphere.

Shapes: mu (..., d) unit vectors, kappa (...) >= 0, x (..., d). The batch dimensions of x and mu
broadcast like jax.numpy; kappa broadcasts to mu's batch shape but never extends it, so a kappa of
shape (B, 1) next to mu of shape (B, d) raises instead of silently producing a (B, B) result.

Numerics (float32 safe for d up to 4096 and kappa up to 1e6):
- log C uses a Stirling-series log-gamma difference (as tfp.math.log_gamma_difference does), so
  lgamma(a) - lgamma(a + b) keeps its precision when a is huge;
- 1 + mu^T x is computed as |mu + x|^2 / 2, exact for unit vectors and precise near mu^T x = -1;
- sampling draws the Beta marginal through two log-gamma variates, so 1 - t and sqrt(1 - t^2) never
  suffer cancellation, and the Householder reflection is the identity when mu = e1.
"""

import math
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
from jax.scipy import special

Array = jax.Array

# Below this argument lgamma/digamma are evaluated directly; above it, Stirling series.
_STIRLING_MIN = 8.0


def at_least_float32(x: Array) -> Array:
    """x in float32, or kept in float64 if it is (the losses' precision; tests run float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / max(|x|, eps) along axis: the projection onto the unit sphere
    (torch.nn.functional.normalize); finite gradient at x = 0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _check_shapes(mu: Array, kappa: Array) -> tuple[int, ...]:
    """Validates mu (..., d) and kappa (...); returns the batch shape mu.shape[:-1]."""
    if mu.ndim < 1 or mu.shape[-1] < 2:
        raise ValueError(f"mu must have shape (..., d) with d >= 2, got {mu.shape}.")
    batch_shape = mu.shape[:-1]
    try:
        broadcast = jnp.broadcast_shapes(kappa.shape, batch_shape)
    except ValueError:
        broadcast = None
    trailing_one = kappa.ndim > 0 and kappa.shape[-1] == 1 and batch_shape[-1:] != (1,)
    if broadcast != batch_shape or trailing_one:
        raise ValueError(
            f"kappa must have mu's batch shape {batch_shape} (or broadcast to it), got "
            f"{kappa.shape}; mu has shape {mu.shape}. A trailing dimension of size 1 is not "
            "allowed: pass kappa[..., 0].")
    return batch_shape


def _check_event(x: Array, mu: Array) -> None:
    if x.ndim < 1 or x.shape[-1] != mu.shape[-1]:
        raise ValueError(f"x must have shape (..., {mu.shape[-1]}) like mu, got {x.shape}.")


def _stirling_correction(z: Array) -> Array:
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi) / 2] for z >= 8 (error < 1e-12)."""
    w = 1.0 / (z * z)
    return (1.0 / 12.0 + w * (-1.0 / 360.0 + w * (1.0 / 1260.0 - w / 1680.0))) / z


def _stirling_correction_grad(z: Array) -> Array:
    """Derivative of _stirling_correction: digamma(z) - log z + 1 / (2 z) for z >= 8."""
    w = 1.0 / (z * z)
    return w * (-1.0 / 12.0 + w * (1.0 / 120.0 + w * (-1.0 / 252.0 + w / 240.0)))


def _log_gamma_difference(x: Array, y: Array) -> Array:
    """lgamma(y) - lgamma(x + y) for x, y > 0 without cancellation when y >> 1.

    For y >= 8 the Stirling terms are rearranged so that the two O(y log y) parts cancel
    analytically (the same scheme as tfp.math.log_gamma_difference).
    """
    big = y >= _STIRLING_MIN
    y_big = jnp.where(big, y, _STIRLING_MIN)
    y_small = jnp.where(big, 1.0, y)
    stirling = (-(x + y_big - 0.5) * jnp.log1p(x / y_big) - x * jnp.log(y_big) + x
                + _stirling_correction(y_big) - _stirling_correction(x + y_big))
    direct = special.gammaln(y_small) - special.gammaln(x + y_small)
    return jnp.where(big, stirling, direct)


def _digamma_difference(x: Array, y: Array) -> Array:
    """digamma(y) - digamma(x + y), the y-derivative of _log_gamma_difference, stably."""
    big = y >= _STIRLING_MIN
    y_big = jnp.where(big, y, _STIRLING_MIN)
    y_small = jnp.where(big, 1.0, y)
    stirling = (-jnp.log1p(x / y_big) - 0.5 * x / (y_big * (x + y_big))
                + _stirling_correction_grad(y_big) - _stirling_correction_grad(x + y_big))
    direct = special.digamma(y_small) - special.digamma(x + y_small)
    return jnp.where(big, stirling, direct)


def _marginal_params(kappa: Array, dim: int) -> tuple[Array, float]:
    """Parameters (a, b) of the Beta marginal of (1 + mu^T x) / 2."""
    b = (dim - 1) / 2.0
    return b + kappa, b


def _log_sphere_area(dim: int) -> float:
    """log |S^{dim-1}| = log(2 pi^{dim/2} / Gamma(dim/2))."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def log_normalizer(kappa: Array, dim: int) -> Array:
    """log C(kappa, d), the log of the normalisation constant in Eq. 11 (negative in general)."""
    kappa = jnp.asarray(kappa)
    a, b = _marginal_params(kappa, dim)
    return -((a + b) * math.log(2.0) + b * math.log(math.pi) + _log_gamma_difference(b, a))


def _expected_log1p_cosine(kappa: Array, dim: int) -> Array:
    """E[log(1 + mu^T x)] = log 2 + digamma(a) - digamma(a + b) under PS(mu, kappa)."""
    a, b = _marginal_params(kappa, dim)
    return math.log(2.0) + _digamma_difference(b, a)


def log_prob(x: Array, mu: Array, kappa: Array) -> Array:
    """log PS(x; mu, kappa) = log C(kappa) + kappa log(1 + mu^T x)  (Eq. 11); shape (...)."""
    x, mu, kappa = jnp.asarray(x), jnp.asarray(mu), jnp.asarray(kappa)
    _check_shapes(mu, kappa)
    _check_event(x, mu)
    one_plus_cos = 0.5 * jnp.sum(jnp.square(mu + x), axis=-1)
    # The density is 0 at x = -mu: there log(1 + mu.x) is clamped at log(tiny) (about -87),
    # and the double `where` keeps its gradient finite (zero) instead of inf * 0.
    tiny = jnp.finfo(one_plus_cos.dtype).tiny
    positive = one_plus_cos > tiny
    log_one_plus_cos = jnp.where(positive, jnp.log(jnp.where(positive, one_plus_cos, 1.0)),
                                 jnp.log(tiny))
    return log_normalizer(kappa, mu.shape[-1]) + kappa * log_one_plus_cos


def entropy(mu: Array, kappa: Array) -> Array:
    """Differential entropy -log C - kappa E[log(1 + mu^T x)]; shape mu.shape[:-1]."""
    mu, kappa = jnp.asarray(mu), jnp.asarray(kappa)
    batch_shape = _check_shapes(mu, kappa)
    dim = mu.shape[-1]
    kappa = jnp.broadcast_to(kappa, batch_shape)
    return -log_normalizer(kappa, dim) - kappa * _expected_log1p_cosine(kappa, dim)


def kl_to_uniform(mu: Array, kappa: Array) -> Array:
    """KL(PS(mu, kappa) || Uniform(S^{d-1})) = log |S^{d-1}| - entropy; shape mu.shape[:-1]."""
    mu = jnp.asarray(mu)
    return _log_sphere_area(mu.shape[-1]) - entropy(mu, kappa)


def mean(mu: Array, kappa: Array) -> Array:
    """E[x] = mu kappa / (d - 1 + kappa); shape (..., d)."""
    mu, kappa = jnp.asarray(mu), jnp.asarray(kappa)
    batch_shape = _check_shapes(mu, kappa)
    kappa = jnp.broadcast_to(kappa, batch_shape)
    return mu * (kappa / (mu.shape[-1] - 1 + kappa))[..., None]


def _reflect_e1_onto(mu: Array, y: Array) -> Array:
    """Applies the Householder reflection H (H e1 = mu, H = H^T) to y.

    u = e1 - mu with 1 - mu_1 = |mu_{2:}|^2 / (1 + mu_1) for mu_1 > 0 (no cancellation near
    mu = e1). When |u| is below float precision H is the identity, to the same precision.
    """
    mu_first, mu_rest = mu[..., :1], mu[..., 1:]
    rest_sq = jnp.sum(jnp.square(mu_rest), axis=-1, keepdims=True)
    u_first = jnp.where(mu_first > 0, rest_sq / (1.0 + jnp.maximum(mu_first, 0.0)), 1.0 - mu_first)
    u = jnp.concatenate([u_first, -mu_rest], axis=-1)
    u_sq = jnp.square(u_first) + rest_sq
    identity = u_sq < jnp.finfo(u_sq.dtype).eps ** 2
    scale = jnp.where(identity, 0.0, 2.0 / jnp.where(identity, 1.0, u_sq))
    return y - scale * u * jnp.sum(u * y, axis=-1, keepdims=True)


def sample(key: Array, mu: Array, kappa: Array, sample_shape: Sequence[int] = ()) -> Array:
    """Reparameterised samples of shape sample_shape + mu.shape; gradients flow to mu and kappa.

    The marginal t = mu^T x is 2 Beta(a, b) - 1, drawn as (G_a - G_b) / (G_a + G_b) from Gamma
    variates with implicit reparameterisation gradients; the tangent part is uniform on
    S^{d-2}; the Householder reflection of e1 onto mu rotates the result into place.
    """
    mu, kappa = jnp.asarray(mu), jnp.asarray(kappa)
    batch_shape = _check_shapes(mu, kappa)
    dim = mu.shape[-1]
    shape = tuple(sample_shape) + batch_shape
    a, b = _marginal_params(jnp.broadcast_to(kappa, batch_shape), dim)
    key_a, key_b, key_tangent = jax.random.split(key, 3)
    log_gamma_a = jax.random.loggamma(key_a, jnp.broadcast_to(a, shape), dtype=mu.dtype)
    log_gamma_b = jax.random.loggamma(key_b, jnp.full(shape, b, mu.dtype), dtype=mu.dtype)
    log_total = jnp.logaddexp(log_gamma_a, log_gamma_b)
    t = jnp.exp(log_gamma_a - log_total) - jnp.exp(log_gamma_b - log_total)
    sin_t = 2.0 * jnp.exp(0.5 * (log_gamma_a + log_gamma_b) - log_total)  # sqrt(1 - t^2)
    tangent = jax.random.normal(key_tangent, shape + (dim - 1,), mu.dtype)
    tangent = tangent / jnp.linalg.norm(tangent, axis=-1, keepdims=True)
    y = jnp.concatenate([t[..., None], sin_t[..., None] * tangent], axis=-1)
    return _reflect_e1_onto(mu, y)


@flax.struct.dataclass
class PowerSpherical:
    """PS(mu, kappa) as a pytree; each method calls the function of the same name."""

    mu: Array
    kappa: Array

    def log_prob(self, x: Array) -> Array:
        return log_prob(x, self.mu, self.kappa)

    def sample(self, key: Array, sample_shape: Sequence[int] = ()) -> Array:
        return sample(key, self.mu, self.kappa, sample_shape)

    def entropy(self) -> Array:
        return entropy(self.mu, self.kappa)

    def kl_to_uniform(self) -> Array:
        return kl_to_uniform(self.mu, self.kappa)

    def mean(self) -> Array:
        return mean(self.mu, self.kappa)

    def log_normalizer(self) -> Array:
        return log_normalizer(self.kappa, self.mu.shape[-1])
