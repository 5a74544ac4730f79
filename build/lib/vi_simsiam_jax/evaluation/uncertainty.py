"""Is the predicted concentration kappa a useful uncertainty? Pure numpy/jax analysis functions.

- `auroc`: how well kappa separates images the linear probe gets right from those it gets wrong,
  or in-distribution images from others (Mann-Whitney U statistic over rank sums, ties counted
  one half); `roc_curve` and `fpr_at_tpr` (FPR at 95% TPR) for out-of-distribution detection;
- `risk_coverage` / `accuracy_at_coverage`: probe accuracy as the least certain images (lowest
  kappa) are set aside (selective classification);
- `loss_surface`: -log PS(z; mu, kappa) over cos(mu, z) and kappa, the part of Eq. 12 shown in
  paper Fig. 3;
- `kappa_stats`: summary statistics of the predicted kappa (paper Fig. 4's histogram).
"""

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from vi_simsiam_jax import power_spherical


def _as_1d(name: str, values: np.ndarray | Sequence[float]) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array, got shape {values.shape}.")
    return values


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values, tied values sharing the mean of their ranks."""
    values = _as_1d("values", values)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2.0)[inverse]


def _scored_labels(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positives as bool), both non-empty 1-d arrays of one shape, else ValueError."""
    scores, positives = _as_1d("scores", scores), _as_1d("positives", positives).astype(bool)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} differ in shape.")
    return scores, positives


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positives` (Mann-Whitney).

    AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos the sum of the positives'
    average ranks: the probability that a random positive scores above a random negative, ties
    counting 1/2. NaN when either class is empty.
    """
    scores, positives = _scored_labels(scores, positives)
    num_pos = int(positives.sum())
    num_neg = positives.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    rank_sum = average_ranks(scores.astype(np.float64))[positives].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of "score >= t" for every distinct score t,
    from the highest threshold down, preceded by (0, 0): the ROC curve, whose trapezoidal area
    is `auroc`. Positives are the class expected to score high (in-distribution, correct)."""
    scores, positives = _scored_labels(scores, positives)
    if positives.all() or not positives.any():
        raise ValueError("An ROC curve needs both positives and negatives.")
    thresholds, inverse = np.unique(-scores.astype(np.float64), return_inverse=True)
    true = np.cumsum(np.bincount(inverse, weights=positives, minlength=thresholds.size))
    false = np.cumsum(np.bincount(inverse, weights=~positives, minlength=thresholds.size))
    return (np.concatenate([[0.0], false / false[-1]]),
            np.concatenate([[0.0], true / true[-1]]))


def fpr_at_tpr(scores: np.ndarray, positives: np.ndarray, tpr: float = 0.95) -> float:
    """The lowest false positive rate of a threshold "score >= t" that keeps at least `tpr` of
    the positives (FPR at 95% TPR, the out-of-distribution detection convention)."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}.")
    false, true = roc_curve(scores, positives)
    return float(false[np.argmax(true >= tpr - 1e-12)])


def risk_coverage(confidence: np.ndarray, correct: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy on the most confident fraction of examples, for every fraction.

    Returns (coverage, accuracy), both (N,): entry i keeps the i + 1 most confident examples
    (ties in stable input order), coverage = (i + 1) / N, accuracy = their fraction correct.
    """
    confidence, correct = _as_1d("confidence", confidence), _as_1d("correct", correct)
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} differ in "
                         "shape.")
    order = np.argsort(-confidence, kind="stable")
    kept = np.arange(1, confidence.size + 1)
    return kept / confidence.size, np.cumsum(correct[order].astype(np.float64)) / kept


def accuracy_at_coverage(confidence: np.ndarray, correct: np.ndarray,
                         coverages: Sequence[float]) -> np.ndarray:
    """Accuracy on the ceil(c N) most confident examples for each coverage c in (0, 1]."""
    coverages = np.asarray(coverages, dtype=np.float64)
    if np.any((coverages <= 0) | (coverages > 1)):
        raise ValueError(f"Coverages must lie in (0, 1], got {coverages.tolist()}.")
    _, accuracy = risk_coverage(confidence, correct)
    kept = np.ceil(coverages * accuracy.size - 1e-9).astype(int)
    return accuracy[kept - 1]


def loss_surface(cosines: np.ndarray, kappas: np.ndarray, dim: int) -> np.ndarray:
    """-log PS(z; mu, kappa) (Eq. 11) for unit z, mu with mu.z = cosine; shape (K, C).

    Rows follow kappas (K,), columns cosines (C,) in [-1, 1]; evaluated with
    `power_spherical.log_prob` in dimension dim (the model's projection size).
    """
    cosines, kappas = _as_1d("cosines", cosines), _as_1d("kappas", kappas)
    if np.any(np.abs(cosines) > 1):
        raise ValueError("Cosine similarities must lie in [-1, 1].")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}.")
    z = np.zeros((cosines.size, dim), np.float64)
    z[:, 0] = cosines
    z[:, 1] = np.sqrt(np.clip(1.0 - cosines**2, 0.0, None))
    mu = jnp.zeros((kappas.size, cosines.size, dim), jnp.float32).at[..., 0].set(1.0)
    kappa = jnp.broadcast_to(jnp.asarray(kappas, jnp.float32)[:, None], mu.shape[:-1])
    return -np.asarray(power_spherical.log_prob(jnp.asarray(z, jnp.float32), mu, kappa))


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """(N,) largest softmax probability of each row of logits (N, C), in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)


def kappa_stats(kappa: np.ndarray) -> dict[str, float]:
    """Mean, std, min, max and the 5/25/50/75/95th percentiles of kappa."""
    kappa = _as_1d("kappa", kappa).astype(np.float64)
    percentiles = (5, 25, 50, 75, 95)
    stats = {"mean": kappa.mean(), "std": kappa.std(), "min": kappa.min(), "max": kappa.max()}
    stats.update({f"p{p}": v for p, v in zip(percentiles, np.percentile(kappa, percentiles))})
    return {name: float(value) for name, value in stats.items()}
