"""kappa analysis: AUROC (closed cases and scipy's Mann-Whitney U), risk-coverage, the Fig. 3
loss surface against its closed form in d = 3, and the SimSiam error."""

import math

import numpy as np
import pytest
from scipy import stats

from vi_simsiam_jax.evaluation import kappa_report
from tests import tiny_config
from vi_simsiam_jax.evaluation import uncertainty


@pytest.mark.parametrize("scores,positives,expected", [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # perfect separation
    ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),  # reversed
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied
    ([0.1, 0.4, 0.4, 0.9], [0, 0, 1, 1], 0.875),  # one tie counts 1/2: (1 + 1 + 0.5 + 1) / 4
])
def test_auroc_closed_cases(scores, positives, expected):
    assert uncertainty.auroc(np.array(scores), np.array(positives)) == pytest.approx(expected)


def test_auroc_equals_mann_whitney_u_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    positives = rng.random(300) < 0.2 + 0.03 * scores
    u = stats.mannwhitneyu(scores[positives], scores[~positives]).statistic
    expected = u / (positives.sum() * (~positives).sum())
    assert uncertainty.auroc(scores, positives) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(uncertainty.average_ranks(scores), stats.rankdata(scores))


def test_auroc_of_one_class_is_nan_and_shapes_are_checked():
    assert math.isnan(uncertainty.auroc(np.array([1.0, 2.0]), np.array([True, True])))
    with pytest.raises(ValueError, match="differ in shape"):
        uncertainty.auroc(np.zeros(3), np.zeros(2, bool))


def test_risk_coverage_sets_aside_the_least_confident():
    confidence = np.array([0.9, 0.1, 0.8, 0.2])
    correct = np.array([True, False, True, True])
    coverage, accuracy = uncertainty.risk_coverage(confidence, correct)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(accuracy, [1.0, 1.0, 1.0, 0.75])  # order 0.9, 0.8, 0.2, 0.1
    np.testing.assert_allclose(
        uncertainty.accuracy_at_coverage(confidence, correct, [1.0, 0.75, 0.5, 0.3]),
        [0.75, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        uncertainty.accuracy_at_coverage(confidence, correct, [0.0])


def test_loss_surface_matches_closed_form_in_three_dimensions():
    # d = 3: C(kappa)^-1 = 2^(kappa + 2) pi / (kappa + 1), so
    # -log PS = (kappa + 2) log 2 + log pi - log(kappa + 1) - kappa log(1 + cos).
    cosines = np.array([-0.9, -0.3, 0.0, 0.5, 1.0])
    kappas = np.array([0.5, 1.0, 7.0, 40.0])
    k, c = kappas[:, None], cosines[None, :]
    expected = (k + 2) * np.log(2) + np.log(np.pi) - np.log(k + 1) - k * np.log1p(c)
    surface = uncertainty.loss_surface(cosines, kappas, dim=3)
    assert surface.shape == (4, 5)
    np.testing.assert_allclose(surface, expected, rtol=2e-5, atol=2e-5)


def test_loss_surface_flattens_as_kappa_falls():
    """Fig. 3: low kappa (high uncertainty) makes the loss almost constant in the similarity."""
    cosines = np.linspace(-0.9, 1.0, 20)
    surface = uncertainty.loss_surface(cosines, np.array([1.0, 10.0, 100.0]), dim=64)
    assert np.all(np.diff(surface, axis=1) < 0)  # more similar, lower loss
    spread = surface.max(axis=1) - surface.min(axis=1)
    assert spread[0] < spread[1] < spread[2]


def test_kappa_stats():
    kappa = np.arange(1.0, 101.0)
    summary = uncertainty.kappa_stats(kappa)
    assert summary["mean"] == pytest.approx(50.5)
    assert (summary["min"], summary["max"]) == (1.0, 100.0)
    assert summary["p50"] == pytest.approx(np.median(kappa))


def test_simsiam_workdir_has_no_kappa():
    config = tiny_config.get_config()
    config.method = "simsiam"
    with pytest.raises(ValueError, match="kappa exists only for method='vi_simsiam'"):
        kappa_report.check_kappa(config, "runs/x")
