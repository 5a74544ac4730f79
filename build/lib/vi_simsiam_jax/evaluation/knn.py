"""Weighted k-nearest-neighbour classifier on frozen features (the InstDisc / SimSiam monitor).

Features are compared by cosine similarity; each of the k most similar training examples votes
for its label with weight exp(similarity / temperature) (Wu et al. 2018, Sec. 3.4), and the class
with the largest summed weight wins. Defaults k = 200, temperature = 0.1 follow InstDisc and the
kNN monitor of the SimSiam/MoCo code bases. Everything is jittable; the test features are
processed in chunks so the (chunk, N_train) similarity matrix bounds the memory.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vi_simsiam_jax.power_spherical import l2_normalize

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "temperature", "chunk_size"))
def knn_scores(train_features: Array, train_labels: Array, test_features: Array, *,
               num_classes: int, k: int = 200, temperature: float = 0.1,
               chunk_size: int = 256) -> Array:
    """Class scores (M, num_classes): sum of exp(cos / T) over each test row's k neighbours.

    train_features (N, D), train_labels (N,) int, test_features (M, D). k is clamped to N.
    """
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(f"train_labels must have shape {train_features.shape[:1]}, got "
                         f"{train_labels.shape}.")
    k = min(k, train_features.shape[0])

    def chunk_scores(similarities: Array) -> Array:
        similarity, neighbours = jax.lax.top_k(similarities, k)
        weights = jnp.exp(similarity / temperature)
        votes = jax.nn.one_hot(train_labels[neighbours], num_classes, dtype=jnp.float32)
        return jnp.einsum("mk,mkc->mc", weights, votes)

    return _map_similarities(chunk_scores, train_features, test_features, chunk_size)


@functools.partial(jax.jit, static_argnames="chunk_size")
def max_similarity(train_features: Array, test_features: Array, *,
                   chunk_size: int = 256) -> Array:
    """(M,) cosine similarity of each test row to its nearest training row: the kNN monitor's
    top similarity, an out-of-distribution score (high = close to the training data)."""
    return _map_similarities(lambda s: s.max(axis=-1), train_features, test_features,
                             chunk_size)


def _map_similarities(fn: Callable[[Array], Array], train_features: Array,
                      test_features: Array, chunk_size: int) -> Array:
    """fn applied to the (chunk, N) cosine similarities of chunks of test rows to all training
    rows, results concatenated over the M test rows."""
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"Features must be (N, D) and (M, D), got {train_features.shape} and "
                         f"{test_features.shape}.")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"Train features have dimension {train_features.shape[1]} but test "
                         f"features {test_features.shape[1]}.")
    train = l2_normalize(train_features.astype(jnp.float32))
    num_test = test_features.shape[0]
    num_chunks = -(-num_test // chunk_size)
    test = l2_normalize(test_features.astype(jnp.float32))
    test = jnp.pad(test, ((0, num_chunks * chunk_size - num_test), (0, 0)))
    out = jax.lax.map(lambda chunk: fn(chunk @ train.T),
                      test.reshape(num_chunks, chunk_size, -1))
    return out.reshape(num_chunks * chunk_size, *out.shape[2:])[:num_test]


def knn_predict(train_features: Array, train_labels: Array, test_features: Array, *,
                num_classes: int, k: int = 200, temperature: float = 0.1) -> Array:
    """Predicted labels (M,): the class with the largest weighted vote (ties: lowest index)."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes=num_classes,
                        k=k, temperature=temperature)
    return jnp.argmax(scores, axis=-1)


def knn_top1(train_features: Array, train_labels: Array, test_features: Array,
             test_labels: Array, *, num_classes: int, k: int = 200,
             temperature: float = 0.1) -> float:
    """Top-1 accuracy in percent; usable as a monitor during pretraining."""
    predictions = knn_predict(train_features, train_labels, test_features,
                              num_classes=num_classes, k=k, temperature=temperature)
    return float(100.0 * jnp.mean(predictions == jnp.asarray(test_labels)))
