"""The selection protocol's pure parts: the learning-rate grid and its extension rule, and the
training curves a record keeps."""

import json
import math

import pytest

from experiments import protocol


def _scores(best: float, failed: tuple[float, ...] = ()):
    """A score peaked at `best` (log scale), -inf for the `failed` rates; records every call."""
    calls = []

    def score(rate: float) -> float:
        calls.append(rate)
        return -math.inf if rate in failed else -abs(math.log2(rate / best))

    return score, calls


@pytest.mark.parametrize("best,expected,calls", [
    (0.4, 0.4, [0.2, 0.4, 0.8]),  # inside the grid: no extension
    (1.6, 1.6, [0.2, 0.4, 0.8, 1.6, 3.2]),  # the high edge wins twice, then 1.6 is inside
    (0.05, 0.05, [0.2, 0.4, 0.8, 0.1, 0.05, 0.025]),
    (100.0, 6.4, [0.2, 0.4, 0.8, 1.6, 3.2, 6.4]),  # at most 3 extensions a side
])
def test_the_grid_is_extended_while_its_edge_scores_best(best, expected, calls):
    score, called = _scores(best)
    assert protocol.choose_learning_rate([0.4, 0.2, 0.8], score) == pytest.approx(expected)
    assert called == pytest.approx(calls)


def test_a_diverged_rate_scores_minus_infinity_and_ties_go_to_the_lower_rate():
    score, called = _scores(0.8, failed=(1.6,))
    # 0.8 is the edge and best: 1.6 is tried, diverges, and 0.8 stays the choice.
    assert protocol.choose_learning_rate([0.2, 0.4, 0.8], score) == 0.8
    assert called == [0.2, 0.4, 0.8, 1.6]
    assert protocol.choose_learning_rate([0.1, 0.2, 0.4], lambda rate: 1.0,
                                         max_extensions=0) == 0.1
    assert protocol.choose_learning_rate([0.1, 0.2], lambda rate: -math.inf) == 0.1


def test_training_curves_keep_one_row_per_step_after_a_resume(tmp_path):
    rows = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0},
            {"step": 20, "loss": 2.5, "z_std": 0.9},  # logged again after a resume
            {"step": 20, "knn_top1_local_val": 40.0, "knn_eval_s": 1.0},  # the kNN monitor
            {"step": 30, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert protocol.training_curves(str(tmp_path)) == [
        {"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5, "z_std": 0.9},
        {"step": 30, "loss": 1.0}]
