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

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from vi_simsiam_jax import checkpoints, datasets  # noqa: E402
from vi_simsiam_jax.evaluation import corruptions as corruption_ops  # noqa: E402
from vi_simsiam_jax.evaluation import encoder, knn, linear_probe, uncertainty  # noqa: E402

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


def _stacked(inside: Scores, outside: Scores, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(score `name` of inside then outside, positives: True for the inside rows)."""
    scores = np.concatenate([inside[name], outside[name]])
    return scores, np.arange(scores.size) < inside[name].size


def detection(inside: Scores, outside: Scores) -> dict[str, dict[str, float]]:
    """{score: {"auroc", "fpr_at_95_tpr"}} for telling `inside` (positives) from `outside`."""
    results = {}
    for name in inside:
        scores, positives = _stacked(inside, outside, name)
        results[name] = {"auroc": uncertainty.auroc(scores, positives),
                         "fpr_at_95_tpr": uncertainty.fpr_at_tpr(scores, positives, TPR)}
    return results


def _kappa_summary(scores: Scores) -> dict[str, float]:
    if "kappa" not in scores:
        return {}
    return {"kappa_mean": float(scores["kappa"].mean()),
            "kappa_median": float(np.median(scores["kappa"]))}


def plot_histograms(inside: Scores, outside: Scores, names: tuple[str, str], path: str) -> None:
    """One panel per score: its distribution on the in- and out-of-distribution images."""
    fig, axes = plt.subplots(1, len(inside), figsize=(3.6 * len(inside), 3.2), squeeze=False)
    for ax, name in zip(axes[0], inside):
        values = np.concatenate([inside[name], outside[name]])
        log = name == "kappa" and values.min() > 0 and values.max() > 20 * values.min()
        bins = (np.geomspace(values.min(), values.max(), 50) if log
                else np.linspace(values.min(), values.max(), 50))
        for scores, label, colour in ((inside, names[0], "tab:blue"),
                                      (outside, names[1], "tab:orange")):
            ax.hist(scores[name], bins=bins, alpha=0.55, color=colour, density=True,
                    label=f"{label} ({scores[name].size})")
        ax.set(xscale="log" if log else "linear", xlabel=name, yticks=[])
    axes[0, 0].legend(frameon=False, fontsize=8)
    fig.suptitle("in- vs out-of-distribution validation images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc(inside: Scores, outside: Scores, results: dict[str, dict[str, float]],
             path: str) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for name in inside:
        fpr, tpr = uncertainty.roc_curve(*_stacked(inside, outside, name))
        ax.plot(fpr, tpr, label=f"{name}: AUROC {results[name]['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax.axhline(TPR, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="out-of-distribution images accepted (FPR)",
           ylabel="in-distribution images accepted (TPR)", title="ROC, high score = in")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_corruptions(curves: dict[str, list[dict[str, Any]]], path: str) -> None:
    """top-1, median kappa (VI-SimSiam) and the AUROC of kappa (else of max_softmax) for clean vs
    corrupted images, against severity, one line per corruption."""
    first = next(iter(curves.values()))
    primary = "kappa" if "kappa_median" in first[0] else "max_softmax"
    panels = [("top1", "linear probe top-1 (%)")]
    if primary == "kappa":
        panels.append(("kappa_median", "median $\\kappa$"))
    panels.append((primary, f"AUROC of {primary}: clean vs corrupted"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, points in curves.items():
            severities = [p["severity"] for p in points]
            values = [p[key] if key in p else p["detection"][key]["auroc"]
                      for p in points]
            ax.plot(severities, values, marker="o", label=name)
        ax.set(xlabel="severity (0 = clean)", ylabel=label, xticks=severities)
    axes[0, 0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cells(points: list[dict[str, Any]], severities: Sequence[int], value) -> str:
    """'a / b / c': value(point) at each of `severities` ('-' where missing)."""
    by_severity = {p["severity"]: p for p in points}
    return " / ".join(value(by_severity[s]) if s in by_severity else "-" for s in severities)


def markdown_tables(summaries: Sequence[dict[str, Any]],
                    severities: Sequence[int] = (1, 3, 5)) -> str:
    """The README's tables from ood.json summaries: OOD detection (AUROC and FPR at 95% TPR per
    score) and, per corruption, top-1, median kappa and AUROCs at `severities`."""
    header = " | ".join(SCORES)
    lines = ["| encoder | probe top-1 | out-of-distribution | " + header + " |",
             "|---" * (3 + len(SCORES)) + "|"]
    for s in summaries:
        if "ood" not in s:
            continue
        detection = s["ood"]["detection"]
        scores = [f"{detection[k]['auroc']:.3f} ({detection[k]['fpr_at_95_tpr']:.2f})"
                  if k in detection else "-" for k in SCORES]
        lines.append(f"| {s['method']}, {s['dataset']} | {s['clean']['top1']:.2f} | "
                     f"{s['ood']['dataset']} | " + " | ".join(scores) + " |")
    levels = " / ".join(str(v) for v in severities)
    lines += ["", f"| encoder | corruption | top-1 at severity 0 / {levels} | median kappa at "
              f"0 / {levels} | AUROC of kappa at {levels} | AUROC of max_softmax at {levels} |",
              "|---" * 6 + "|"]
    for s in summaries:
        for name, points in s.get("corruptions", {}).items():
            has_kappa = "kappa_median" in points[0]
            lines.append(" | ".join([
                f"| {s['method']}, {s['dataset']}", name,
                _cells(points, (0, *severities), lambda p: f"{p['top1']:.1f}"),
                _cells(points, (0, *severities), lambda p: f"{p['kappa_median']:.0f}")
                if has_kappa else "-",
                _cells(points, severities, lambda p: f"{p['detection']['kappa']['auroc']:.2f}")
                if has_kappa else "-",
                _cells(points, severities,
                       lambda p: f"{p['detection']['max_softmax']['auroc']:.2f}")]) + " |")
    return "\n".join(lines)


def _load_ood(name: str, pretrain_config: ml_collections.ConfigDict,
              archive: str | None) -> tuple[str, datasets.Examples]:
    """(split read, examples) of the OOD dataset: its val split, else its train split."""
    if datasets.resolve_config(name).name == datasets.resolve_config(
            pretrain_config.dataset).name:
        raise ValueError(f"The out-of-distribution dataset {name} is the pretraining dataset.")
    builder = datasets.prepare(name, data_dir=pretrain_config.data_dir or None, archive=archive,
                               download=False)
    split = "val" if "validation" in builder.info.splits else "train"
    return split, datasets.load_examples(builder, split)


def analyze(workdir: str, *, ood_dataset: str | None = None, ood_archive: str | None = None,
            corruptions: Sequence[str] = corruption_ops.CORRUPTIONS,
            severities: Sequence[int] = corruption_ops.SEVERITIES, step: int | None = None,
            predictions: str | None = None, output_dir: str | None = None,
            batch_size: int = 256,
            probe_config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """Writes the figures and ood.json to output_dir (default workdir/ood_analysis) and returns
    the summary. The linear probe's head and image size come from its predictions file (run
    first with probe_config if it does not exist)."""
    pretrain_config = checkpoints.load_config(workdir)
    for name in corruptions:
        for severity in severities:
            corruption_ops.check(name, severity)
    if ood_dataset:  # before any feature is computed, so a missing dataset fails fast
        ood_split, ood_examples = _load_ood(ood_dataset, pretrain_config, ood_archive)
    predictions = linear_probe.find_predictions(workdir, step, predictions, probe_config)
    with np.load(predictions) as f:
        data = dict(f)
    head, head_variables = linear_probe.restore_head(data, predictions)
    _, model, variables, step, train_examples, val_examples = encoder.load(
        workdir, int(data["step"]), random_init=False)
    centre = functools.partial(encoder.centre_crop_features, model, variables,
                               batch_size=batch_size, image_size=int(data["image_size"]))
    train_features = centre(train_examples).features

    def evaluate(rows: encoder.FeatureSet) -> tuple[Scores, float]:
        logits = np.asarray(head.apply(head_variables, rows.features, False))
        top1 = linear_probe.accuracy(logits, rows.labels)["top1"]
        return feature_scores(rows, logits, train_features), top1

    clean, clean_top1 = evaluate(centre(val_examples))
    output_dir = output_dir or os.path.join(workdir, "ood_analysis")
    os.makedirs(output_dir, exist_ok=True)
    files = {}
    summary: dict[str, Any] = {
        "workdir": os.path.abspath(workdir), "step": step, "method": pretrain_config.method,
        "dataset": pretrain_config.dataset, "predictions": predictions,
        "image_size": int(data["image_size"]), "num_val": len(val_examples),
        "scores": list(clean), "clean": {"top1": clean_top1, **_kappa_summary(clean)},
        "pretrain_config": pretrain_config.to_dict(),
    }

    if ood_dataset:
        outside, _ = evaluate(centre(ood_examples))
        results = detection(clean, outside)
        files["ood_histograms"] = os.path.join(output_dir, "ood_histograms.png")
        files["ood_roc"] = os.path.join(output_dir, "ood_roc.png")
        plot_histograms(clean, outside, (pretrain_config.dataset, ood_dataset),
                        files["ood_histograms"])
        plot_roc(clean, outside, results, files["ood_roc"])
        summary["ood"] = {"dataset": ood_dataset, "split": ood_split,
                          "num_images": len(ood_examples), **_kappa_summary(outside),
                          "detection": results}

    if corruptions and severities:
        curves = {}
        unchanged = {k: {"auroc": v["auroc"]} for k, v in detection(clean, clean).items()}
        for name in corruptions:
            curves[name] = [{"severity": 0, "top1": clean_top1, **_kappa_summary(clean),
                             "detection": unchanged}]
            for severity in severities:
                corrupted, top1 = evaluate(centre(
                    val_examples, corruption=corruption_ops.corruption(name, severity)))
                curves[name].append({
                    "severity": severity, "parameter": corruption_ops.PARAMETERS[name][
                        severity - 1], "top1": top1, **_kappa_summary(corrupted),
                    "detection": {k: {"auroc": v["auroc"]}
                                  for k, v in detection(clean, corrupted).items()}})
                logging.info("%s severity %d: top-1 %.2f", name, severity, top1)
        files["corruptions"] = os.path.join(output_dir, "corruptions.png")
        plot_corruptions(curves, files["corruptions"])
        summary["corruptions"] = curves

    files["summary"] = os.path.join(output_dir, "ood.json")
    summary["files"] = files
    with open(files["summary"], "w") as f:
        json.dump(summary, f, indent=2)
    return summary
