"""The statistics of Table 1: mean +- std, paired t intervals, the Wilcoxon p and bootstrap
interval, leave-one-out, learning targets, the sensitivity arm and its verdict."""

import itertools
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
               (statistics.paired_t(dict(enumerate(d)), {0: 0, 1: 0, 2: 0})["interval"]
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
    assert ("the interval excludes 0: VI-SimSiam is ahead of SimSiam. Wilcoxon signed-rank p "
            "= 0.2500 (exact), paired bootstrap 95% CI [+5.00, +7.00]; the verdict changes with "
            "any one of seeds 0, 1 left out; the Wilcoxon p or the bootstrap disagrees: the "
            "verdict rests on the t interval alone. kNN top-1: -2.00 [-2.00, -2.00]. Collapsed "
            "runs (lowest z_std below 0.5): SimSiam seeds 0, 1, 2; VI-SimSiam seeds 0, 1, 2. "
            "Learning targets (gain over the random-init encoder of the same "
            "seed: top-1 +10, kNN +5): SimSiam missed top-1 (+9.00), met kNN top-1 (+6.00); "
            "VI-SimSiam met top-1 (+15.00), missed kNN top-1 (+4.00).") in table
    assert ("| d | 1 | 39.00 / 26.00; z_std 0.40 @ 30 → 1.00 (collapsed) | 45.00 / 24.00; "
            "z_std 0.40 @ 30 → 1.00 (collapsed) | 30.00 / 20.00 |") in table
    assert summary["collapsed"]["d"] == {"simsiam": [0, 1, 2], "vi_simsiam": [0, 1, 2]}
    # 6 points every seed: Wilcoxon's smallest p for 3 seeds, 2 / 2^3; a point bootstrap.
    assert summary["differences"]["d"]["top1"]["wilcoxon_p"] == 0.25
    assert summary["differences"]["d"]["knn_top1"]["bootstrap_interval"] == [-2.0, -2.0]


def test_verdict_follows_the_interval():
    def summary(dataset, low, high, n=3):
        difference = {m: {"n": n, "mean": (low + high) / 2, "interval": [low, high],
                          "wilcoxon_p": 0.25, "bootstrap_interval": [low, high]}
                      for m in ("top1", "knn_top1")}
        runs = {m: {0: {"learning_rate": 0.5, "num_epochs": 12}}
                for m in ("simsiam", "vi_simsiam")}
        return {"differences": {dataset: difference}, "runs": {dataset: runs}, "gains": {},
                "collapsed": {dataset: {}}, "sensitivity": {}}

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


def _signed_rank_p(differences):
    """Wilcoxon's exact two-sided p from its definition: the share of the 2^n sign assignments
    of the ranks of |d| whose positive-rank sum is at least as far from n(n+1)/4 as observed."""
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1  # no ties in the data used
    observed = ranks[differences > 0].sum()
    centre = ranks.sum() / 2
    sums = [sum(r for r, sign in zip(ranks, signs) if sign)
            for signs in itertools.product([0, 1], repeat=len(ranks))]
    return np.mean([abs(t - centre) >= abs(observed - centre) for t in sums])


def test_wilcoxon_p_is_exact():
    # One negative difference, the smallest in size: T = 1 of 21, p = 2 * 2 / 64.
    six = np.array([5.22, 1.32, 7.79, 4.22, 3.16, -0.89])
    assert statistics.wilcoxon_p(six) == 0.0625
    rng = np.random.default_rng(1)
    for n in (5, 8, 12):
        differences = rng.normal(0.5, 1.0, n)
        assert statistics.wilcoxon_p(differences) == pytest.approx(
            _signed_rank_p(differences), rel=1e-12)
    assert statistics.wilcoxon_p(np.zeros(4)) == 1.0
    # Zero differences are dropped (Wilcoxon's convention): as if only the 3 others were there.
    assert statistics.wilcoxon_p(np.array([0.0, 1.0, 2.0, 3.0])) == 0.25


def test_bootstrap_interval_is_reproducible_and_covers():
    """The BCa interval is the same on every call (fixed generator), brackets the mean, and
    for normal differences covers the true mean about as often as its confidence (Monte
    Carlo, 400 draws of 12: binomial std of the rate 1.1%; BCa runs a little under at n=12)."""
    differences = np.array([5.22, 1.32, 7.79, 4.22, 3.16, -0.89])
    first = statistics.bootstrap_interval(differences, 0.95)
    assert first == statistics.bootstrap_interval(differences, 0.95)
    assert first[0] < differences.mean() < first[1]
    rng = np.random.default_rng(0)
    covered = [low <= 1.0 <= high for low, high in
               (statistics.bootstrap_interval(rng.normal(1.0, 2.0, 12), 0.95)
                for _ in range(400))]
    assert 0.88 < np.mean(covered) < 0.99


def test_leave_one_out_and_confirmation_seeds():
    simsiam = {seed: {"top1": 30.0, "top5": 0.0, "knn_top1": 0.0} for seed in range(8)}
    vi_simsiam = {seed: {**simsiam[seed], "top1": 30.0 + d}
                  for seed, d in enumerate([2.0, 2.5, 3.0, 2.2, 2.8, 2.4, 4.0, -15.0])}
    top1 = table1_report.compare(vi_simsiam, simsiam)["top1"]
    assert table1_report.direction(top1["interval"]) == "not resolved"
    # Only without seed 7 (the -15) do the others exclude 0.
    assert top1["leave_one_out"]["changes_verdict"] == [7]
    assert top1["confirmation_seeds"]["seeds"] == [6, 7]
    assert top1["confirmation_seeds"]["mean"] == -5.5


def test_sensitivity_arm_and_a_verdict_that_depends_on_the_rate(tmp_path):
    (tmp_path / table1_report.SENSITIVITY_DIR).mkdir()
    for seed in range(4):
        _record(tmp_path / f"imagewoof_simsiam_seed{seed}.json", "imagewoof", "simsiam", seed,
                20 + seed % 2, 18)
        _record(tmp_path / f"imagewoof_vi_simsiam_seed{seed}.json", "imagewoof", "vi_simsiam",
                seed, 25 + seed % 2 / 2, 20)
        # The sensitivity arm's SimSiam is as good as VI-SimSiam, give or take a point.
        path = tmp_path / table1_report.SENSITIVITY_DIR / f"imagewoof_simsiam_seed{seed}.json"
        _record(path, "imagewoof", "simsiam", seed, 25 + (-1) ** seed, 21)
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "learning_rate": 0.05,
                                    "workdir": f"runs/sensitivity{seed}"}))
    summary = table1_report.summarize(str(tmp_path))
    arm = summary["sensitivity"]["imagewoof"]
    assert arm["cell"]["top1"]["mean"] == 25.0 and arm["collapsed"] == [0, 1, 2, 3]
    assert arm["differences"]["top1"]["mean"] == 0.25
    assert summary["compute"]["pretraining_runs"] == 12
    text = table1_report.verdict("imagewoof", summary)
    assert ("Sensitivity arm, SimSiam at lr 0.05 x 6 epochs (4 paired seeds): VI-SimSiam − "
            "SimSiam top-1 +0.25 [") in text
    assert "the interval contains 0: the difference is not resolved" in text
    assert "so the imagewoof verdict depends on SimSiam's learning rate." in text
    headline = table1_report.headline(summary)
    assert headline.startswith(
        "**Verdict** (VI-SimSiam − SimSiam, linear-probe top-1, 95% t interval): imagewoof: "
        "VI-SimSiam ahead with SimSiam at lr 0.1, not resolved at lr 0.05 (the verdict depends "
        "on SimSiam's learning rate).")
    assert "| imagewoof | 0.05 (sensitivity) | 4 | 25.00 ± 1.15 | 25.25 ± 0.29 | +0.25 [" \
        in headline
    table = table1_report.markdown(summary)
    assert "| imagewoof | SimSiam lr 0.05 (sensitivity) | 4 | 25.00 ± 1.15 |" in table
    assert ("| imagewoof | 3 | 21.00 / 18.00; z_std 0.40 @ 30 → 1.00 (collapsed) | 25.50 / "
            "20.00; z_std 0.40 @ 30 → 1.00 (collapsed) |  | 24.00 / 21.00; z_std 0.40 @ 30 → "
            "1.00 (collapsed) |") in table


def test_headline_marks_a_verdict_that_one_seed_left_out_changes(tmp_path):
    # Both datasets' intervals lie above 0; only "fragile"'s loses that with one seed left out.
    differences = {"robust": [1.0, 2.0, 1.5, 1.2], "fragile": [1.0, 3.0, 1.5, 1.2]}
    for (dataset, by_seed), method in itertools.product(differences.items(),
                                                        ("simsiam", "vi_simsiam")):
        for seed, difference in enumerate(by_seed):
            top1 = 30 + (difference if method == "vi_simsiam" else 0)
            _record(tmp_path / f"{dataset}_{method}_seed{seed}.json", dataset, method, seed,
                    top1, 20)
    headline = table1_report.headline(table1_report.summarize(str(tmp_path)))
    verdicts = headline.splitlines()[0].split("interval): ")[1]
    assert sorted(verdicts.rstrip(".").split("; ")) == [
        "fragile: VI-SimSiam ahead (changes with any one of seeds 0, 2, 3 left out)",
        "robust: VI-SimSiam ahead"]
