"""SimSiam (paper Eq. 1) and VI-SimSiam (Eq. 12) losses for M views, with diagnostics.

Views and pairs. Predictions come from all M views (multi-crop: global views first, then local
views); targets are the stop-gradient projections of the first G views only (the global views), as
in SwAV/DINO multi-crop: local views are never targets. The loss runs over the ordered pairs
(i, j) with j < G, i < M, i != j (the i = j terms are dropped, as Sec. 4 suggests), i.e.
P = G (M - 1) pairs.

Normalisation: the mean over the P pairs and the batch. For M = 2 this is
  SimSiam:     (D(p1, z2) + D(p2, z1)) / 2 with D = -cos, exactly SimSiam's loss;
  VI-SimSiam:  L.mean() / 2 for Alg. 1's L = -p1.log_prob(z2) - p2.log_prob(z1),
i.e. Eq. 12 (a sum over pairs) divided by P and averaged over the batch.

Targets are l2-normalised onto the unit sphere and their gradient is stopped inside the losses, so
the caller may pass raw projections z (the stop-gradient or EMA target network's output).
Everything is computed in float32.
"""

from typing import Sequence

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from vi_simsiam_jax import power_spherical
from vi_simsiam_jax.power_spherical import l2_normalize

Array = jax.Array


@flax.struct.dataclass
class SiameseOutput:
    """One view's outputs of models.SiameseNet, as the losses read them; leading batch dimension B.

    features: (B, 8 * width) backbone features (linear evaluation uses these).
    z: (B, dim) float32 projection f_phi(x), not normalised (BN output).
    mu: (B, dim) float32 unit-norm prediction (the mean direction of Eq. 11); None if predict=False.
    kappa: (B,) float32 concentration (vi_simsiam only; None for simsiam or predict=False).
    """

    features: Array
    z: Array
    mu: Array | None = None
    kappa: Array | None = None


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
    mu = l2_normalize(jnp.stack(list(predictions)).astype(jnp.float32))
    z = l2_normalize(jax.lax.stop_gradient(jnp.stack(list(targets)).astype(jnp.float32)))
    chex.assert_rank([mu, z], 3)
    chex.assert_equal_shape_suffix([mu, z], 2)
    i_idx, j_idx = view_pairs(mu.shape[0], z.shape[0])
    return mu[i_idx], z[j_idx], z, i_idx


def _diagnostics(mu_pairs: Array, z_pairs: Array, z: Array) -> dict[str, Array]:
    """Mean prediction-target cosine over pairs; collapse monitor sqrt(d) * mean_k std_b(z_bk)
    of the unit targets (about 1 for well-spread z, 0 when collapsed; SimSiam Sec. 4.1)."""
    z_std = jnp.mean(jnp.std(z, axis=1)) * np.sqrt(z.shape[-1])
    return {"cosine": jnp.mean(jnp.sum(mu_pairs * z_pairs, axis=-1)), "z_std": z_std}


def simsiam_loss(predictions: Sequence[Array], targets: Sequence[Array]
                 ) -> tuple[Array, dict[str, Array]]:
    """Symmetric negative cosine (Eq. 1): mean over pairs and batch of -cos(p_i, stopgrad(z_j)).

    predictions: M arrays (B, d), one per view (global first); targets: G <= M arrays (B, d), the
    projections of the global views. Returns (loss, diagnostics).
    """
    mu_p, z_p, z, _ = _paired(predictions, targets)
    cos = jnp.sum(mu_p * z_p, axis=-1)
    return -jnp.mean(cos), _diagnostics(mu_p, z_p, z)


def vi_simsiam_loss(mus: Sequence[Array], kappas: Sequence[Array], targets: Sequence[Array]
                    ) -> tuple[Array, dict[str, Array]]:
    """VI-SimSiam (Eq. 12): mean over pairs and batch of -log PS(stopgrad(z_j); mu_i, kappa_i).

    mus: M arrays (B, d) (normalised here if they are not unit already); kappas: M arrays (B,);
    targets: G <= M arrays (B, d) of global-view projections. With a constant kappa this is
    -log C(kappa) - kappa * mean log(1 + cos(mu_i, z_j)), the PS analogue of Eq. 9.
    Returns (loss, diagnostics incl. kappa mean/min/max/std over all views and the batch).
    """
    mu_p, z_p, z, i_idx = _paired(mus, targets)
    kappa = jnp.stack(list(kappas)).astype(jnp.float32)
    chex.assert_shape(kappa, (len(mus), mu_p.shape[1]))
    nll = -power_spherical.log_prob(z_p, mu_p, kappa[i_idx])
    metrics = _diagnostics(mu_p, z_p, z)
    metrics.update(kappa_mean=jnp.mean(kappa), kappa_min=jnp.min(kappa),
                   kappa_max=jnp.max(kappa), kappa_std=jnp.std(kappa))
    return jnp.mean(nll), metrics


def ssl_loss(method: str, outputs: Sequence[SiameseOutput], targets: Sequence[Array]
             ) -> tuple[Array, dict[str, Array]]:
    """Dispatches on method ("simsiam" | "vi_simsiam") using the per-view outputs' mu (and kappa);
    targets as from models.target_projections (global views only)."""
    if method == "simsiam":
        return simsiam_loss([o.mu for o in outputs], targets)
    if method == "vi_simsiam":
        return vi_simsiam_loss([o.mu for o in outputs], [o.kappa for o in outputs], targets)
    raise ValueError(f"method must be 'simsiam' or 'vi_simsiam', got {method!r}.")
