"""Linear evaluation of a frozen pretrained encoder (paper Sec. 6.1-6.2).

Protocol (SimSiam's, which the paper follows): the backbone's pooled features, BatchNorm in
inference mode and nothing of the encoder updated; a fc layer initialised N(0, 0.01) with zero
bias; cross-entropy; LARS (lr 1.6, momentum 0.9, weight decay 0, trust coefficient 0.001) with
cosine decay, batch 512; random-resized-crop + flip for training, resize + centre crop for
evaluation. By default a BatchNorm without affine parameters precedes the fc (MoCo v3 / MAE).
The learning rate is chosen among config.lr_sweep on the paper's local split (80% of train to
fit, 20% to score, Sec. 6.1); the final head is fit on all of train and evaluated on val. With
config.eval_split="local_val" no val image is encoded or scored: the result is the best sweep
head's top-1 on local_val (and kNN from local_train), the score for choosing pretraining
hyper-parameters.

Modes (see experiments/configs/probe.py):
- "cached" (default, fast): the encoder runs once per image (the centre crop, or `train_views`
  augmented copies of the training set) and the head trains on the stored features with a jitted
  step, so the epochs and an lr sweep cost seconds;
- "online": SimSiam's recipe exactly, the frozen encoder applied to fresh augmentations at every
  step (one encoder pass per training image and epoch).

`evaluate` returns a `ProbeResult` in memory: the metrics (top-1/top-5 in percent, kNN top-1,
the sweep, timings), the fitted head, the scored rows with their logits and, in cached mode, the
centre-crop features of the training split; the kappa and OOD analyses take it as it is.
Writing files is the experiment modules' job (experiments/reporting.py).
"""

import dataclasses
import functools
import itertools
import time
from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from vi_simsiam_jax import datasets, input_pipeline
from vi_simsiam_jax.evaluation import encoder, knn

Array = jax.Array
MODES = ("cached", "online")
EVAL_SPLITS = ("val", "local_val")


class LinearClassifier(nn.Module):
    """fc on frozen features, initialised N(0, 0.01) / 0 (SimSiam); optionally preceded by a
    BatchNorm without affine parameters."""

    num_classes: int
    batch_norm: bool = False

    @nn.compact
    def __call__(self, features: Array, train: bool) -> Array:
        if self.batch_norm:
            features = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                    use_scale=False, use_bias=False, name="bn")(features)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                        name="fc")(features)


class HeadState(train_state.TrainState):
    batch_stats: Any


def _is_matrix(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)


def lars_optimizer(learning_rate: float, num_steps: int, config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
    """LARS with cosine decay of learning_rate to 0 over num_steps (paper Sec. 6.2).

    As in the LARS of SimCLR/BYOL, the bias is excluded from the trust ratio and weight decay
    (plain momentum SGD). SimSiam's LARC adapts it too, which gives the zero-initialised bias a
    full-learning-rate first step that then dominates the logits for hundreds of steps.
    """
    return optax.lars(optax.cosine_decay_schedule(learning_rate, num_steps),
                      weight_decay=config.weight_decay, weight_decay_mask=_is_matrix,
                      trust_coefficient=config.trust_coefficient, trust_ratio_mask=_is_matrix,
                      momentum=config.momentum)


def create_head_state(rng: Array, feature_dim: int, num_classes: int,
                      tx: optax.GradientTransformation, batch_norm: bool) -> HeadState:
    head = LinearClassifier(num_classes=num_classes, batch_norm=batch_norm)
    variables = head.init(rng, jnp.zeros((1, feature_dim), jnp.float32), False)
    return HeadState.create(apply_fn=head.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}))


@jax.jit
def head_train_step(state: HeadState, features: Array, labels: Array
                    ) -> tuple[HeadState, Array]:
    """One cross-entropy step of the head; returns the new state and the batch loss."""

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         features, True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


@jax.jit
def head_logits(state: HeadState, features: Array) -> Array:
    """Inference-mode logits (N, num_classes)."""
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, features,
                          False)


def cached_batches(features: np.ndarray, labels: np.ndarray, batch_size: int,
                   seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless batches of stored features: a fresh permutation per epoch, last partial dropped."""
    if len(labels) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(labels)} training rows.")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(labels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield features[rows], labels[rows]


def fit_linear_head(batches: Iterable[tuple[Array, Array]], num_steps: int, feature_dim: int,
                    num_classes: int, learning_rate: float, config: ml_collections.ConfigDict
                    ) -> HeadState:
    """Trains a fresh head for num_steps batches of (features, labels) with LARS + cosine."""
    tx = lars_optimizer(learning_rate, num_steps, config)
    state = create_head_state(jax.random.key(config.seed), feature_dim, num_classes, tx,
                              config.head_batch_norm)
    loss = jnp.nan
    for features, labels in itertools.islice(batches, num_steps):
        state, loss = head_train_step(state, features, labels)
    loss = float(loss)
    if not np.isfinite(loss):
        raise FloatingPointError(f"Linear probe loss is {loss} after {num_steps} steps at "
                                 f"learning rate {learning_rate}; lower the learning rate.")
    logging.info("Head fit: lr %g, %d steps, final batch loss %.4f.", learning_rate, num_steps,
                 loss)
    return state


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-example bool: the label is among the k highest logits (k clamped to the classes)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :min(k, logits.shape[-1])]
    return np.any(top == labels[:, None], axis=-1)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent."""
    return {f"top{k}": float(100.0 * topk_correct(logits, labels, k).mean()) for k in (1, 5)}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first probe config field with an invalid value."""
    checks = [
        ("mode", config.mode in MODES, f"one of {MODES}"),
        ("eval_split", config.eval_split in EVAL_SPLITS, f"one of {EVAL_SPLITS}"),
        ("lr_sweep", config.eval_split == "val" or len(config.lr_sweep) > 0,
         'non-empty with eval_split="local_val" (the sweep is the evaluation)'),
        ("train_views", config.train_views >= 0, ">= 0"),
        ("train_views", config.mode == "cached" or config.train_views == 0,
         "0 in online mode (views are drawn fresh every step)"),
        ("image_size", config.image_size >= 0, ">= 0 (0: the pretraining global_size)"),
        ("batch_size", config.batch_size > 0, "positive"),
        ("extract_batch_size", config.extract_batch_size > 0, "positive"),
        ("num_epochs", config.num_epochs > 0, "positive"),
        ("learning_rate", config.learning_rate > 0, "positive"),
        ("lr_sweep", all(lr > 0 for lr in config.lr_sweep), "positive learning rates"),
        ("knn_k", config.knn_k > 0, "positive"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"Invalid probe config.{name} = {config[name]!r}: must be "
                             f"{expected}.")


def _knn_top1(train_rows: encoder.FeatureSet, val: encoder.FeatureSet, num_classes: int,
              config: ml_collections.ConfigDict) -> float:
    return knn.knn_top1(train_rows.features, train_rows.labels, val.features, val.labels,
                        num_classes=num_classes, k=config.knn_k,
                        temperature=config.knn_temperature)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What `evaluate` computed, handed over in memory."""

    metrics: dict[str, Any]  # JSON-ready: accuracies, sweep, sizes, timings, probe config
    head: HeadState  # the fitted head (inference: `head_logits`)
    scored: encoder.FeatureSet  # the rows scored: val, or local_val
    scored_examples: datasets.Examples  # the split that scored.index points into
    logits: np.ndarray  # (len(scored), num_classes) float32
    train: encoder.FeatureSet | None  # centre-crop features of train (cached mode), else None


def _probe_rows(frozen: encoder.FrozenEncoder, train_examples: datasets.Examples,
                val_examples: datasets.Examples, config: ml_collections.ConfigDict,
                image_size: int) -> tuple[Any, Any, Any, encoder.FeatureSet, datasets.Examples]:
    """The features `evaluate` needs: (the head's training rows, the centre-crop rows of
    train, of local_val, the scored rows, and the examples they index). mode "cached" extracts
    train once (None for the first two when "online": features stream per fit)."""
    model, variables = frozen.model, frozen.variables
    local_val = datasets.local_val_mask(train_examples.file_names)
    centre = functools.partial(encoder.centre_crop_features, model, variables,
                               batch_size=config.extract_batch_size, image_size=image_size)
    train_centre = centre(train_examples) if config.mode == "cached" else None
    if config.mode == "cached":
        train_rows = (encoder.augmented_features(model, variables, train_examples, config,
                                                 image_size)
                      if config.train_views else train_centre)
        local_val_rows = train_centre.subset(local_val[train_centre.index])
    else:
        train_rows = None
        local_val_rows = (centre(train_examples.subset(local_val)) if config.lr_sweep
                          else None)
    if config.eval_split == "local_val":  # rows indexed in train (cached) or local_val (online)
        return (train_rows, train_centre, local_val_rows, local_val_rows,
                train_examples if train_centre is not None else train_examples.subset(local_val))
    return train_rows, train_centre, local_val_rows, centre(val_examples), val_examples


def evaluate(frozen: encoder.FrozenEncoder, train_examples: datasets.Examples,
             val_examples: datasets.Examples, config: ml_collections.ConfigDict) -> ProbeResult:
    """Linear evaluation of a frozen encoder.

    The learning rate is the best of config.lr_sweep by top-1 on local_val after a fit on
    local_train (config.learning_rate if the sweep is empty). With config.eval_split="val" a
    head fit on all of train is scored on val; with "local_val" the best sweep head's local_val
    score is the result and no val image is encoded.
    """
    start = time.perf_counter()
    validate_config(config)
    local_only = config.eval_split == "local_val"
    model, variables = frozen.model, frozen.variables
    image_size = config.image_size or frozen.config.global_size
    num_classes = len(train_examples.label_names)
    local_val = datasets.local_val_mask(train_examples.file_names)
    times = {}

    tic = time.perf_counter()
    rows = _probe_rows(frozen, train_examples, val_examples, config, image_size)
    train_rows, train_centre, local_val_rows, val, val_examples = rows
    feature_dim = val.features.shape[1]
    times["extract"] = time.perf_counter() - tic

    def fit(learning_rate: float, keep: np.ndarray) -> HeadState:
        """A head fit on the training images with keep[index] True."""
        num_images = int(keep.sum())
        batch_size = min(config.batch_size, num_images)
        num_steps = config.num_epochs * (num_images // batch_size)
        if config.mode == "cached":
            rows = train_rows.subset(keep[train_rows.index])
            batches = cached_batches(rows.features, rows.labels, batch_size, config.seed)
        else:
            dataset = input_pipeline.probe_train_dataset(
                train_examples.subset(keep), **encoder.single_host(
                    batch_size=batch_size, seed=config.seed, image_size=image_size,
                    scale=tuple(config.crop_scale), num_steps=num_steps))
            batches = encoder.stream_features(model, variables, dataset)
        return fit_linear_head(batches, num_steps, feature_dim, num_classes, learning_rate,
                               config)

    tic = time.perf_counter()
    sweep, sweep_fits = {}, {}
    for learning_rate in config.lr_sweep:
        head = fit(learning_rate, ~local_val)
        logits = np.asarray(head_logits(head, local_val_rows.features))
        top1 = accuracy(logits, local_val_rows.labels)["top1"]
        sweep[float(learning_rate)] = top1
        if local_only:
            sweep_fits[float(learning_rate)] = head, logits
        logging.info("lr %g: local_val top-1 %.2f%%", learning_rate, top1)
    best_lr = max(sweep, key=sweep.get) if sweep else config.learning_rate
    times["sweep"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if local_only:
        head, logits = sweep_fits[best_lr]
    else:
        head = fit(best_lr, np.ones(len(train_examples), bool))
        logits = np.asarray(head_logits(head, val.features))
    times["fit"] = time.perf_counter() - tic
    metrics = {
        "step": frozen.step, "random_init": frozen.random_init, "eval_split": config.eval_split,
        "method": frozen.config.method, "dataset": frozen.config.dataset,
        **accuracy(logits, val.labels), "top5_k": min(5, num_classes),
        "learning_rate": best_lr, "lr_sweep_local_val_top1": {str(k): v for k, v in sweep.items()},
        "image_size": image_size, "feature_dim": feature_dim,
        "num_train": int((~local_val).sum()) if local_only else len(train_examples),
        "num_val": len(val.labels), "num_classes": num_classes,
    }
    if train_centre is not None:
        knn_train = train_centre
        if local_only:
            knn_train = train_centre.subset(~local_val[train_centre.index])
        metrics["knn_top1"] = _knn_top1(knn_train, val, num_classes, config)
    times["total"] = time.perf_counter() - start
    metrics.update(probe_config=config.to_dict(), wall_time_s=times)
    return ProbeResult(metrics, head, val, val_examples, logits.astype(np.float32), train_centre)
