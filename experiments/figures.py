"""The figures of the kappa and OOD analyses (matplotlib, written as PNG files): drawn from the
evaluators' results by experiments/reporting.py."""

import io
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vi_simsiam_jax.evaluation import (kappa_report, linear_probe, ood_report,  # noqa: E402
                                       uncertainty)
from vi_simsiam_jax.evaluation.ood_report import Scores  # noqa: E402


def _thumbnail(jpeg: bytes, size: int = 96) -> np.ndarray:
    """The image as stored (no normalisation), centre-cropped to a square of `size` px."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size)))


def plot_histogram(kappa: np.ndarray, low: float, high: float, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(kappa, bins=60, color="tab:blue")
    ax.axvline(low, color="tab:red", ls="--", lw=1, label="lowest-kappa grid")
    ax.axvline(high, color="tab:green", ls="--", lw=1, label="highest-kappa grid")
    ax.set(xlabel="predicted concentration $\\kappa$", ylabel="validation images",
           title=f"$\\kappa$ on {kappa.size} validation images")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_extremes(groups: list[tuple[str, list[dict[str, Any]]]], images: dict[str, np.ndarray],
                  path: str, columns: int = 8) -> None:
    """One block of image tiles per (title, entries) group, entries as in the JSON summary."""
    rows = [-(-len(entries) // columns) for _, entries in groups]
    fig = plt.figure(figsize=(1.5 * columns, 1.75 * sum(rows) + 0.5 * len(groups)))
    subfigs = fig.subfigures(len(groups), 1, height_ratios=rows)
    for subfig, (title, entries), num_rows in zip(np.atleast_1d(subfigs), groups, rows):
        subfig.suptitle(title)
        axes = subfig.subplots(num_rows, columns, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, entry in zip(axes.flat, entries):
            ax.imshow(images[entry["file_name"]])
            ax.set_title(f"$\\kappa$={entry['kappa']:.3g}\n{entry['class']}", fontsize=7,
                         color="tab:green" if entry["probe_correct"] else "tab:red")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_surface(cosines: np.ndarray, kappas: np.ndarray, marked: dict[str, float],
                      dim: int, path: str) -> None:
    """Left: -log PS over cosines (ending at 1) and kappas; right: its rise above the cos = 1
    value for the marked kappas (name -> kappa)."""
    surface = uncertainty.loss_surface(cosines, kappas, dim)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    vmin, vmax = np.percentile(surface, [1, 95])
    mesh = left.pcolormesh(cosines, kappas, surface, shading="auto", vmin=vmin, vmax=vmax,
                           cmap="viridis")
    left.contour(cosines, kappas, surface, levels=np.linspace(vmin, vmax, 12), colors="white",
                 linewidths=0.4)
    for name, value in marked.items():
        left.axhline(value, color="tab:orange", ls="--", lw=0.8)
        left.text(-0.98, value * 1.05, name, color="tab:orange", fontsize=7)
    left.set(yscale="log", xlabel="cos($\\mu$, z)", ylabel="$\\kappa$",
             title=f"$-\\log PS(z; \\mu, \\kappa)$, d = {dim} (colour clipped)")
    fig.colorbar(mesh, ax=left)
    marked_surface = uncertainty.loss_surface(cosines, np.array(list(marked.values())), dim)
    rise = marked_surface - marked_surface[:, -1:]
    for (name, value), curve in zip(marked.items(), rise):
        right.plot(cosines, curve, label=f"{name}: $\\kappa$={value:.3g}")
    right.set(ylim=(0, 1.1 * rise[:, cosines >= -0.9].max()), xlabel="cos($\\mu$, z)",
              ylabel="$-\\log PS$ minus its value at cos = 1",
              title="low $\\kappa$: almost flat in the similarity")
    right.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], overall: float,
                       path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (coverage, accuracy) in curves.items():
        ax.plot(100 * coverage, 100 * accuracy, label=name,
                ls=":" if name == "oracle" else "-")
    ax.axhline(100 * overall, color="gray", ls="--", lw=1, label="random order")
    ax.set(xlabel="coverage: % of validation images kept (most certain first)",
           ylabel="linear probe top-1 (%)", xlim=(100, 0),
           title="Accuracy as the least certain images are set aside")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kappa_figures(result: linear_probe.ProbeResult, summary: dict[str, Any],
                  model_config: ml_collections.ConfigDict, output_dir: str) -> dict[str, str]:
    """The kappa histogram, extreme images, loss surface and risk-coverage curves of a
    kappa_report summary, as PNG files in output_dir; returns {name: path}."""
    files = {name: os.path.join(output_dir, f"{name}.png")
             for name in ("kappa_histogram", "kappa_extremes", "loss_surface", "risk_coverage")}
    lowest, highest = summary["lowest_kappa"], summary["highest_kappa"]
    examples = result.scored_examples
    position = {str(name): i for i, name in enumerate(examples.file_names)}
    images = {e["file_name"]: _thumbnail(examples.images[position[e["file_name"]]])
              for e in lowest + highest}
    plot_extremes([(f"{len(lowest)} lowest $\\kappa$ (most uncertain)", lowest),
                   (f"{len(highest)} highest $\\kappa$ (most certain)", highest)],
                  images, files["kappa_extremes"])
    confidences = kappa_report.confidences(result)
    kappa, correct = confidences["kappa"], confidences["oracle"] > 0
    plot_histogram(kappa, lowest[-1]["kappa"], highest[-1]["kappa"], files["kappa_histogram"])
    stats = summary["kappa"]
    kappa_floor = max(model_config.kappa_min, 1e-2)
    plot_loss_surface(np.linspace(-1.0, 1.0, 201),
                      np.geomspace(kappa_floor, max(2 * stats["max"], 10 * kappa_floor), 60),
                      {"floor": kappa_floor, "p5": stats["p5"], "median": stats["p50"],
                       "p95": stats["p95"], "max": stats["max"]}, model_config.dim,
                      files["loss_surface"])
    curves = {name: uncertainty.risk_coverage(c, correct) for name, c in confidences.items()}
    plot_risk_coverage(curves, float(correct.mean()), files["risk_coverage"])
    return files


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
        fpr, tpr = uncertainty.roc_curve(*ood_report.stacked(inside, outside, name))
        ax.plot(fpr, tpr, label=f"{name}: AUROC {results[name]['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax.axhline(ood_report.TPR, color="gray", ls="--", lw=0.8)
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


def ood_figures(analysis: ood_report.OodAnalysis, output_dir: str) -> dict[str, str]:
    """The OOD histograms and ROC (with an OOD dataset) and the corruption curves, as PNG files
    in output_dir; returns {name: path}."""
    files, summary = {}, analysis.summary
    if analysis.outside is not None:
        files["ood_histograms"] = os.path.join(output_dir, "ood_histograms.png")
        files["ood_roc"] = os.path.join(output_dir, "ood_roc.png")
        plot_histograms(analysis.clean, analysis.outside,
                        (summary["dataset"], summary["ood"]["dataset"]), files["ood_histograms"])
        plot_roc(analysis.clean, analysis.outside, summary["ood"]["detection"], files["ood_roc"])
    if "corruptions" in summary:
        files["corruptions"] = os.path.join(output_dir, "corruptions.png")
        plot_corruptions(summary["corruptions"], files["corruptions"])
    return files
