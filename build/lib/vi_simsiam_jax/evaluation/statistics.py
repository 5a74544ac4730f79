"""Summaries over seeds: mean +- sample standard deviation, and the paired difference of two
methods with its t-distribution confidence interval (seeds as the unit of replication)."""

from collections.abc import Mapping

import numpy as np
from scipy import stats


def mean_std(values: list[float]) -> dict[str, float | int]:
    """n, mean and the sample standard deviation (ddof=1; NaN for a single value)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("mean_std needs at least one value.")
    std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return {"n": int(values.size), "mean": float(values.mean()), "std": std}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
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
