"""SimSiam (paper Eq. 1) and VI-SimSiam (Eq. 12) losses for M views, with diagnostics.

Views and pairs. Predictions come from all M views (multi-crop: global views first, then local
views); targets are the stop-gradient projections of the first G views only (the global views), as
in SwAV/DINO multi-crop: local views are never targets. The loss runs over the ordered pairs
(i, j) with j < G, i < M, i != j (the i = j terms are dropped, as Sec. 4 suggests), i.e.
P = G (M - 1) pairs.

Reduction over pairs (always the mean over the batch): each paper's own is its loss's default
and what config.loss_reduction="paper" picks (REDUCTIONS, `methods.Method.loss_of`):
  SimSiam:     the mean over the P pairs; for M = 2, (D(p1, z2) + D(p2, z1)) / 2 with D = -cos,
               exactly SimSiam's loss (Eq. 1);
  VI-SimSiam:  the sum over the P pairs (Eq. 12); for M = 2, Alg. 1's
               L = -p1.log_prob(z2) - p2.log_prob(z1), L.mean().
"mean" or "sum" forces one for either loss. The effective step size follows: VI-SimSiam's
"sum" gradient is P times its "mean" gradient (P = 2 for two views, 10 for the paper's 2 + 4
crops), so at one learning rate "sum" takes P times larger steps against the same weight decay.

Targets are l2-normalised onto the unit sphere and their gradient is stopped inside the losses, so
the caller may pass raw projections z (the stop-gradient or EMA target network's output).
Everything is computed in float32 (float64 inputs stay float64).
"""

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vi_simsiam_jax import power_spherical
from vi_simsiam_jax.power_spherical import at_least_float32, l2_normalize

Array = jax.Array
REDUCTIONS = ("paper", "mean", "sum")


def view_pairs(num_views: int, num_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """Static (prediction view i, target view j) indices of all pairs j < num_targets, i != j."""
    if not 1 <= num_targets <= num_views or num_views < 2:
        raise ValueError(f"need 2 <= num_views and 1 <= num_targets <= num_views, got "
                         f"num_views={num_views}, num_targets={num_targets}.")
    pairs = [(i, j) for j in range(num_targets) for i in range(num_views) if i != j]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _paired(predictions: Sequence[Array], targets: Sequence[Array]
            ) -> tuple[Array, Array, Array, np.ndarray]:
    """Stacks and validates; returns mu (P, B, d), unit targets (P, B, d), unit targets (G, B, d),
    and the prediction-view index of every pair."""
    mu = l2_normalize(at_least_float32(jnp.stack(list(predictions))))
    z = l2_normalize(jax.lax.stop_gradient(at_least_float32(jnp.stack(list(targets)))))
    chex.assert_rank([mu, z], 3)
    chex.assert_equal_shape_suffix([mu, z], 2)
    i_idx, j_idx = view_pairs(mu.shape[0], z.shape[0])
    return mu[i_idx], z[j_idx], z, i_idx


def _diagnostics(mu_pairs: Array, z_pairs: Array, z: Array) -> dict[str, Array]:
    """Mean prediction-target cosine over pairs; collapse monitor sqrt(d) * mean_k std_b(z_bk)
    of the unit targets (about 1 for well-spread z, 0 when collapsed; SimSiam Sec. 4.1)."""
    z_std = jnp.mean(jnp.std(z, axis=1)) * np.sqrt(z.shape[-1])
    return {"cosine": jnp.mean(jnp.sum(mu_pairs * z_pairs, axis=-1)), "z_std": z_std}


def _reduce(per_pair_and_example: Array, reduction: str) -> Array:
    """(P, B) -> scalar: mean over the batch, then "mean" or "sum" over the P pairs."""
    per_pair = jnp.mean(per_pair_and_example, axis=1)
    if reduction == "mean":
        return jnp.mean(per_pair)
    if reduction == "sum":
        return jnp.sum(per_pair)
    raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}.')


def simsiam_loss(predictions: Sequence[Array], targets: Sequence[Array], reduction: str = "mean"
                 ) -> tuple[Array, dict[str, Array]]:
    """Symmetric negative cosine (Eq. 1): -cos(p_i, stopgrad(z_j)), mean over the batch and
    (default, SimSiam's) mean over the pairs, or "sum" over them.

    predictions: M arrays (B, d), one per view (global first); targets: G <= M arrays (B, d), the
    projections of the global views. Returns (loss, diagnostics).
    """
    mu_p, z_p, z, _ = _paired(predictions, targets)
    cos = jnp.sum(mu_p * z_p, axis=-1)
    return _reduce(-cos, reduction), _diagnostics(mu_p, z_p, z)


def vi_simsiam_loss(mus: Sequence[Array], kappas: Sequence[Array], targets: Sequence[Array],
                    reduction: str = "sum") -> tuple[Array, dict[str, Array]]:
    """VI-SimSiam (Eq. 12, Alg. 1): -log PS(stopgrad(z_j); mu_i, kappa_i), mean over the batch
    and (default, Eq. 12's) sum over the pairs, or "mean" over them.

    mus: M arrays (B, d) (normalised here if they are not unit already); kappas: M arrays (B,);
    targets: G <= M arrays (B, d) of global-view projections. With a constant kappa this is
    -log C(kappa) - kappa * mean log(1 + cos(mu_i, z_j)), the PS analogue of Eq. 9.
    Returns (loss, diagnostics incl. kappa mean/min/max/std over all views and the batch).
    """
    mu_p, z_p, z, i_idx = _paired(mus, targets)
    kappa = at_least_float32(jnp.stack(list(kappas)))
    chex.assert_shape(kappa, (len(mus), mu_p.shape[1]))
    nll = -power_spherical.log_prob(z_p, mu_p, kappa[i_idx])
    metrics = _diagnostics(mu_p, z_p, z)
    metrics.update(kappa_mean=jnp.mean(kappa), kappa_min=jnp.min(kappa),
                   kappa_max=jnp.max(kappa), kappa_std=jnp.std(kappa))
    return _reduce(nll, reduction), metrics
