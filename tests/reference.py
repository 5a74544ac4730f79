"""Independent references the tests compare with: unit vectors and the Power Spherical
log-density (De Cao & Aziz 2020; Eq. 11 of the paper), written from the formulas and not with
vi_simsiam_jax.

The functions are generic in the array library: numpy by default (float64 in, float64 out), or
another one's functions passed in (jax.numpy for `unit`, torch.lgamma and torch.log1p for the
density), so that a test can differentiate through them in that library.
"""

import math

import numpy as np
from scipy import special


def unit(v, xp=np):
    """`v` divided by its Euclidean norm along the last axis; xp: the array library of `v`."""
    return v / xp.linalg.norm(v, axis=-1, keepdims=True)


def power_spherical_log_normalizer(kappa, dim: int, lgamma=special.gammaln):
    """log C_d(kappa) = -((a + b) log 2 + b log pi + log Gamma(a) - log Gamma(a + b)),
    b = (d - 1) / 2, a = b + kappa; lgamma: log Gamma in kappa's array library."""
    b = (dim - 1) / 2
    a = b + kappa
    return -((a + b) * math.log(2) + b * math.log(math.pi) + lgamma(a) - lgamma(a + b))


def power_spherical_log_prob(x, mu, kappa, lgamma=special.gammaln, log1p=np.log1p):
    """log PS(x; mu, kappa) = log C_d(kappa) + kappa log(1 + mu.x) for unit x and mu (the last
    axis is the event); lgamma, log1p: those of the arrays' library."""
    log_c = power_spherical_log_normalizer(kappa, x.shape[-1], lgamma)
    return log_c + kappa * log1p((x * mu).sum(-1))
