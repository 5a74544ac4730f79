"""Does kappa flag inputs the encoder was not trained for? The analysis behind
experiments.analyze_ood: out-of-distribution detection and corruption robustness of a frozen
pretrained encoder, with kappa next to the usual baselines.

Every score is computed on the centre-crop features the linear probe evaluates, and oriented so
that high means in-distribution (or clean):
- kappa: VI-SimSiam's predicted concentration (low = uncertain view, paper Sec. 6.3);
- max_softmax: the linear probe's largest class probability (Hendrycks & Gimpel, ICLR 2017);
- knn_similarity: cosine similarity to the nearest training image (the kNN monitor's top
  neighbour);
- feature_norm: the L2 norm of the pooled backbone features.
A SimSiam encoder has no kappa, so only the baselines are reported for it.

Out of distribution: the pretraining dataset's val images (positives) against another dataset's
(val split, else train), e.g. ImageNette against ImageWoof, whose ten dog breeds are ImageNet
classes ImageNette does not have. Reported per score: AUROC and the FPR at 95% TPR.
Corruptions (evaluation.corruptions): per corruption and severity, probe top-1, kappa's mean and
median, and the AUROC of every score for clean (positive) against corrupted val images.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vi_simsiam_jax import datasets
from vi_simsiam_jax.evaluation import corruptions as corruption_ops
from vi_simsiam_jax.evaluation import encoder, knn, linear_probe, uncertainty

SCORES = ("kappa", "max_softmax", "knn_similarity", "feature_norm")
TPR = 0.95
Scores = dict[str, np.ndarray]


def feature_scores(rows: encoder.FeatureSet, logits: np.ndarray,
                   train_features: np.ndarray) -> Scores:
    """The SCORES that exist for `rows` (kappa only for VI-SimSiam), high = in-distribution."""
    scores = {} if rows.kappa is None else {"kappa": rows.kappa.astype(np.float64)}
    scores["max_softmax"] = uncertainty.max_softmax(logits)
    scores["knn_similarity"] = np.asarray(knn.max_similarity(train_features, rows.features),
                                          np.float64)
    scores["feature_norm"] = np.linalg.norm(rows.features.astype(np.float64), axis=1)
    return scores


def stacked(inside: Scores, outside: Scores, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(score `name` of inside then outside, positives: True for the inside rows)."""
    scores = np.concatenate([inside[name], outside[name]])
    return scores, np.arange(scores.size) < inside[name].size


def detection(inside: Scores, outside: Scores) -> dict[str, dict[str, float]]:
    """{score: {"auroc", "fpr_at_95_tpr"}} for telling `inside` (positives) from `outside`."""
    results = {}
    for name in inside:
        scores, positives = stacked(inside, outside, name)
        results[name] = {"auroc": uncertainty.auroc(scores, positives),
                         "fpr_at_95_tpr": uncertainty.fpr_at_tpr(scores, positives, TPR)}
    return results


def _kappa_summary(scores: Scores) -> dict[str, float]:
    if "kappa" not in scores:
        return {}
    return {"kappa_mean": float(scores["kappa"].mean()),
            "kappa_median": float(np.median(scores["kappa"]))}


def load_ood_examples(name: str, pretrain_config: ml_collections.ConfigDict,
                      archive: str | None = None) -> tuple[str, str, datasets.Examples]:
    """(name, split read, examples) of the OOD dataset: its val split, else its train split;
    `archive` as in `datasets.prepare` (never downloaded)."""
    if datasets.resolve_config(name).name == datasets.resolve_config(
            pretrain_config.dataset).name:
        raise ValueError(f"The out-of-distribution dataset {name} is the pretraining dataset.")
    builder = datasets.prepare(name, data_dir=pretrain_config.data_dir or None, archive=archive,
                               download=False)
    split = "val" if "validation" in builder.info.splits else "train"
    return name, split, datasets.load_examples(builder, split)


@dataclasses.dataclass(frozen=True)
class OodAnalysis:
    """`analyze`'s result: the JSON-ready summary and the scores behind its figures."""

    summary: dict[str, Any]
    clean: Scores  # the scores of the clean scored images
    outside: Scores | None  # of the out-of-distribution images, if a dataset was given


def check_corruptions(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """ValueError naming an unknown corruption or a severity outside 1-5."""
    for name in corruptions:
        for severity in severities:
            corruption_ops.check(name, severity)


def analyze(frozen: encoder.FrozenEncoder, probe: linear_probe.ProbeResult,
            train_examples: datasets.Examples, *,
            ood: tuple[str, str, datasets.Examples] | None = None,
            corruptions: Sequence[str] = corruption_ops.CORRUPTIONS,
            severities: Sequence[int] = corruption_ops.SEVERITIES) -> OodAnalysis:
    """Scores the probe's scored images against the OOD images (ood: (dataset name, split,
    examples), from `load_ood_examples`) and against their corrupted copies, with the probe's
    head and image size; the nearest-neighbour score uses the probe's centre-crop training
    features (computed here in online mode)."""
    check_corruptions(corruptions, severities)
    image_size = probe.metrics["image_size"]
    batch_size = probe.metrics["probe_config"]["extract_batch_size"]
    train = probe.train if probe.train is not None else frozen.features(
        train_examples, batch_size, image_size)
    clean_examples = probe.scored_examples.subset(probe.scored.index)

    def evaluate(rows: encoder.FeatureSet) -> tuple[Scores, float]:
        logits = np.asarray(linear_probe.head_logits(probe.head, rows.features))
        top1 = linear_probe.accuracy(logits, rows.labels)["top1"]
        return feature_scores(rows, logits, train.features), top1

    clean, clean_top1 = feature_scores(probe.scored, probe.logits, train.features), probe.metrics[
        "top1"]
    summary: dict[str, Any] = {
        "step": frozen.step, "method": frozen.config.method, "dataset": frozen.config.dataset,
        "image_size": image_size, "num_val": len(clean_examples),
        "scores": list(clean), "clean": {"top1": clean_top1, **_kappa_summary(clean)},
        "pretrain_config": frozen.config.to_dict(),
    }
    outside = None
    if ood is not None:
        name, split, examples = ood
        outside, _ = evaluate(frozen.features(examples, batch_size, image_size))
        summary["ood"] = {"dataset": name, "split": split, "num_images": len(examples),
                          **_kappa_summary(outside), "detection": detection(clean, outside)}

    if corruptions and severities:
        curves = {}
        unchanged = {k: {"auroc": v["auroc"]} for k, v in detection(clean, clean).items()}
        for name in corruptions:
            curves[name] = [{"severity": 0, "top1": clean_top1, **_kappa_summary(clean),
                             "detection": unchanged}]
            for severity in severities:
                corrupted, top1 = evaluate(frozen.features(
                    clean_examples, batch_size, image_size,
                    corruption=corruption_ops.corruption(name, severity)))
                curves[name].append({
                    "severity": severity, "parameter": corruption_ops.PARAMETERS[name][
                        severity - 1], "top1": top1, **_kappa_summary(corrupted),
                    "detection": {k: {"auroc": v["auroc"]}
                                  for k, v in detection(clean, corrupted).items()}})
                logging.info("%s severity %d: top-1 %.2f", name, severity, top1)
        summary["corruptions"] = curves
    return OodAnalysis(summary, clean, outside)
