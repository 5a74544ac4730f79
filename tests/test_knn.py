"""Weighted kNN classifier: hand-computed votes, a brute-force reference, error messages."""

import numpy as np
import pytest

from tests import reference
from vi_simsiam_jax.evaluation import knn

# Four training points on the unit circle; the test point [1, 0] has cosine similarities
# 1, 0, -1, 0 with them.
TRAIN = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], np.float32)
LABELS = np.array([0, 1, 2, 1], np.int32)
TEST = np.array([[1.0, 0.0]], np.float32)


@pytest.mark.parametrize("temperature,expected", [
    # class 0: exp(1/T); class 1: two neighbours at cos 0, 2 exp(0); class 2: exp(-1/T).
    (1.0, [np.e, 2.0, np.exp(-1.0)]),
    (10.0, [np.exp(0.1), 2.0, np.exp(-0.1)]),
])
def test_scores_match_hand_computed_votes(temperature, expected):
    scores = knn.knn_scores(TRAIN, LABELS, TEST, num_classes=3, k=4, temperature=temperature)
    np.testing.assert_allclose(scores, [expected], rtol=1e-6)
    # Cosine similarity: the scale of the features does not matter.
    rescaled = knn.knn_scores(5 * TRAIN, LABELS, 0.1 * TEST, num_classes=3, k=4,
                              temperature=temperature)
    np.testing.assert_allclose(rescaled, scores, rtol=1e-6)


def test_temperature_and_k_decide_the_vote():
    # T = 1: the single exact match (e = 2.72) outvotes two orthogonal points (2).
    assert knn.knn_predict(TRAIN, LABELS, TEST, num_classes=3, k=4, temperature=1.0)[0] == 0
    # T = 10 flattens the weights, and the two class-1 points win (2 > 1.105).
    assert knn.knn_predict(TRAIN, LABELS, TEST, num_classes=3, k=4, temperature=10.0)[0] == 1
    # k = 1 is the nearest neighbour; k larger than the training set is clamped.
    assert knn.knn_predict(TRAIN, LABELS, TEST, num_classes=3, k=1, temperature=10.0)[0] == 0
    big_k = knn.knn_scores(TRAIN, LABELS, TEST, num_classes=3, k=200, temperature=10.0)
    np.testing.assert_allclose(big_k, [[np.exp(0.1), 2.0, np.exp(-0.1)]], rtol=1e-6)


def test_chunked_scores_match_brute_force():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 6)).astype(np.float32)
    labels = rng.integers(0, 5, 50).astype(np.int32)
    test = rng.normal(size=(11, 6)).astype(np.float32)  # not a multiple of the chunk size
    similarity = reference.unit(test) @ reference.unit(train).T
    expected = np.zeros((11, 5))
    for row, sims in enumerate(similarity):
        for j in np.argsort(-sims)[:7]:
            expected[row, labels[j]] += np.exp(sims[j] / 0.1)
    scores = knn.knn_scores(train, labels, test, num_classes=5, k=7, temperature=0.1,
                            chunk_size=4)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    top1 = knn.knn_top1(train, labels, test, expected.argmax(1), num_classes=5, k=7)
    assert top1 == 100.0


def test_mismatched_dimensions_name_the_problem():
    with pytest.raises(ValueError, match="dimension 2 but test features 3"):
        knn.knn_scores(TRAIN, LABELS, np.zeros((1, 3), np.float32), num_classes=3)
    with pytest.raises(ValueError, match="train_labels must have shape"):
        knn.knn_scores(TRAIN, LABELS[:3], TEST, num_classes=3)
