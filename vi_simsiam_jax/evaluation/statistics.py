"""Summaries over seeds: mean +- sample standard deviation, and the paired difference of two
methods with its t-distribution confidence interval, the exact Wilcoxon signed-rank p and a
paired bootstrap interval (seeds as the unit of replication).

Only experiments/table1_report.py uses it, yet it stays here: it is the analysis code of the
confirmatory Table 1 protocol (experiments/confirm_table1.py, issue 48), which names it as
vi_simsiam_jax.evaluation.statistics and holds it fixed at the protocol's commit, so moving it
beside table1_report would change the files that protocol names."""

from collections.abc import Mapping

import numpy as np
from scipy import stats

# The paired bootstrap: resamples of the seeds' differences, drawn from a fixed generator so
# that a report is reproducible.
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


def mean_std(values: list[float]) -> dict[str, float | int]:
    """n, mean and the sample standard deviation (ddof=1; NaN for a single value)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("mean_std needs at least one value.")
    std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return {"n": int(values.size), "mean": float(values.mean()), "std": std}


def wilcoxon_p(differences: np.ndarray) -> float:
    """The exact two-sided p of Wilcoxon's signed-rank test that the differences are symmetric
    about 0: the statistic's distribution over all 2^n sign assignments (zero differences
    dropped, tied magnitudes midranked; scipy's permutation method, exhaustive here)."""
    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return 1.0
    method = stats.PermutationMethod(n_resamples=2 ** nonzero.size)
    return float(stats.wilcoxon(nonzero, method=method).pvalue)


def bootstrap_interval(differences: np.ndarray, confidence: float) -> list[float]:
    """The BCa bootstrap interval of the mean difference, seeds resampled with replacement
    (BOOTSTRAP_RESAMPLES draws, generator seeded BOOTSTRAP_SEED); a point when all agree."""
    if np.ptp(differences) == 0:
        return [float(differences[0])] * 2
    result = stats.bootstrap((differences,), np.mean, confidence_level=confidence,
                             n_resamples=BOOTSTRAP_RESAMPLES, method="BCa",
                             rng=np.random.default_rng(BOOTSTRAP_SEED))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def paired_t(a: Mapping[int, float], b: Mapping[int, float],
             confidence: float = 0.95) -> dict[str, float | int | list[float]]:
    """a - b over the seeds both hold: mean, std and the two-sided t interval
    mean +- t_{(1+confidence)/2, n-1} std / sqrt(n) (NaN bounds below two seeds)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_difference needs at least one seed present in both.")
    summary = mean_std([a[seed] - b[seed] for seed in seeds])
    n = summary["n"]
    if n > 1:
        half_width = stats.t.ppf((1 + confidence) / 2, n - 1) * summary["std"] / np.sqrt(n)
    else:
        half_width = float("nan")
    interval = [summary["mean"] - half_width, summary["mean"] + half_width]
    return {**summary, "seeds": seeds, "confidence": confidence,
            "interval": [float(x) for x in interval]}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """`paired_t`, and from two seeds on `wilcoxon_p` and `bootstrap_interval` (None below)."""
    summary = paired_t(a, b, confidence)
    differences = np.array([a[seed] - b[seed] for seed in summary["seeds"]], np.float64)
    checks = summary["n"] > 1
    return {**summary, "wilcoxon_p": wilcoxon_p(differences) if checks else None,
            "bootstrap_interval": bootstrap_interval(differences, confidence) if checks else None}
