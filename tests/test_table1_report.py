"""The statistics of Table 1: mean +- std, paired t intervals, learning targets."""

import json
import math

import numpy as np
import pytest

from experiments import table1_report
from vi_simsiam_jax.evaluation import statistics


def test_mean_std_and_paired_interval_by_hand():
    assert statistics.mean_std([1.0, 2.0, 6.0]) == {"n": 3, "mean": 3.0,
                                                     "std": pytest.approx(math.sqrt(7))}
    assert math.isnan(statistics.mean_std([4.0])["std"])
    # Differences 1, 2, 3: mean 2, std 1; with 2 degrees of freedom the t quantile has the
    # closed form t_p = (2p - 1) / sqrt(2p(1 - p)).
    result = statistics.paired_difference({0: 11.0, 1: 12.0, 2: 13.0, 7: 5.0},
                                          {0: 10.0, 1: 10.0, 2: 10.0, 9: 1.0})
    half_width = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert result["seeds"] == [0, 1, 2] and result["mean"] == 2.0
    assert result["interval"] == pytest.approx([2 - half_width, 2 + half_width], rel=1e-12)
    with pytest.raises(ValueError, match="at least one seed"):
        statistics.paired_difference({0: 1.0}, {1: 1.0})


def test_interval_covers_the_mean_at_its_confidence():
    """Monte Carlo: 95% t intervals of 3 normal differences cover the true mean ~95% of the
    time (binomial std of the rate over 4000 draws: 0.35%)."""
    rng = np.random.default_rng(0)
    draws = rng.normal(1.5, 2.0, size=(4000, 3))
    covered = [low <= 1.5 <= high for low, high in
               (statistics.paired_difference(dict(enumerate(d)), {0: 0, 1: 0, 2: 0})["interval"]
                for d in draws)]
    assert abs(np.mean(covered) - 0.95) < 0.015


def _record(path, dataset, method, seed, top1, knn):
    # 60 steps at 1 s per step, one slow interval (the compilation) aside; pretraining runs
    # log z_std, lowest at step 30.
    curves = [{"step": step, "images_per_sec": 8.0 if step == 10 else 64.0}
              for step in range(10, 70, 10)]
    if method != "random_init":
        for row in curves:
            row["z_std"] = 0.4 if row["step"] == 30 else 0.9 + row["step"] / 600
    path.write_text(json.dumps({"dataset": dataset, "method": method, "seed": seed,
                                "workdir": f"runs/{method}{seed}", "curves": curves,
                                "config": {"batch_size": 64}, "learning_rate": 0.1,
                                "num_epochs": 6,
                                "probe": {"top1": top1, "top5": top1 + 40, "knn_top1": knn}}))


def test_summary_differences_and_targets(tmp_path):
    for seed in range(3):
        _record(tmp_path / f"d_random_init_seed{seed}.json", "d", "random_init", seed, 30, 20)
        _record(tmp_path / f"d_simsiam_seed{seed}.json", "d", "simsiam", seed, 38 + seed, 26)
        _record(tmp_path / f"d_vi_simsiam_seed{seed}.json", "d", "vi_simsiam", seed, 45, 24)
    summary = table1_report.summarize(str(tmp_path))
    assert summary["cells"]["d"]["simsiam"]["top1"]["mean"] == 39.0
    assert summary["differences"]["d"]["top1"]["mean"] == 6.0
    assert summary["differences"]["d"]["knn_top1"]["interval"] == [-2.0, -2.0]
    gains = summary["gains"]["d"]
    assert [gains["simsiam"][m]["met"] for m in ("top1", "knn_top1")] == [False, True]
    assert [gains["vi_simsiam"][m]["met"] for m in ("top1", "knn_top1")] == [True, False]
    assert summary["compute"] == {"pretraining_runs": 6, "pretraining_hours": 0.1}  # 6 x 60 s
    table = table1_report.markdown(summary)
    assert "| d | VI-SimSiam − SimSiam, mean [95% CI] | 3 | +6.00 [" in table
    assert "| d | SimSiam | 3 | 39.00 ± 1.00 | 79.00 ± 1.00 | 26.00 ± 0.00 |  |" in table
    assert ("**d** (3 paired seeds; SimSiam lr 0.1 x 6 epochs; VI-SimSiam lr 0.1 x 6 epochs): "
            "VI-SimSiam − SimSiam linear-probe top-1 +6.00 [") in table
    assert ("the interval excludes 0: VI-SimSiam is ahead of SimSiam. kNN top-1: -2.00 "
            "[-2.00, -2.00]. Learning targets (gain over the random-init encoder of the same "
            "seed: top-1 +10, kNN +5): SimSiam missed top-1 (+9.00), met kNN top-1 (+6.00); "
            "VI-SimSiam met top-1 (+15.00), missed kNN top-1 (+4.00).") in table
    assert ("| d | 1 | 39.00 / 26.00; z_std 0.40 @ 30 → 1.00 | 45.00 / 24.00; z_std 0.40 @ 30 "
            "→ 1.00 | 30.00 / 20.00 |") in table


def test_verdict_follows_the_interval():
    def summary(dataset, low, high, n=3):
        difference = {m: {"n": n, "mean": (low + high) / 2, "interval": [low, high]}
                      for m in ("top1", "knn_top1")}
        runs = {m: {0: {"learning_rate": 0.5, "num_epochs": 12}}
                for m in ("simsiam", "vi_simsiam")}
        return {"differences": {dataset: difference}, "runs": {dataset: runs}, "gains": {}}

    behind = table1_report.verdict("d", summary("d", -3.0, -1.0))
    assert "-2.00 [-3.00, -1.00]; the interval excludes 0: SimSiam is ahead of VI-SimSiam" \
        in behind
    assert "paper" not in behind and "targets" not in behind
    unresolved = table1_report.verdict("imagewoof", summary("imagewoof", -1.0, 3.0))
    assert "contains 0: the difference is not resolved; it does not contain the paper's +6.06" \
        in unresolved
    assert "it contains the paper's +6.06" in table1_report.verdict(
        "imagewoof", summary("imagewoof", 1.0, 7.0))
    assert "no interval yet" in table1_report.verdict("d", summary("d", 1.0, 1.0, n=1))
