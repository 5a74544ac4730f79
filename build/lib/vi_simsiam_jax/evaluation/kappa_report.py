"""The kappa analysis behind experiments.analyze_kappa and experiments.demo: `analyze` computes
the statistics and writes the figures and JSON described in experiments/analyze_kappa.py."""

import io
import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vi_simsiam_jax import checkpoints, datasets  # noqa: E402
from vi_simsiam_jax.evaluation import linear_probe, uncertainty  # noqa: E402

COVERAGES = (1.0, 0.9, 0.75, 0.5)


def check_vi_simsiam(workdir: str) -> ml_collections.ConfigDict:
    """The workdir's pretraining config; ValueError unless it is a VI-SimSiam run."""
    config = checkpoints.load_config(workdir)
    if config.method != "vi_simsiam":
        raise ValueError(
            f"{workdir} was pretrained with method={config.method!r}: kappa exists only for "
            "method='vi_simsiam' (the predictor's extra output, paper Sec. 6.2), so there is "
            "nothing to analyse.")
    return config


def load_predictions(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        predictions = dict(data)
    if "kappa" not in predictions:
        raise ValueError(f"{path} holds no kappa: it was written for a SimSiam encoder.")
    return predictions


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


def _accuracy_at_coverages(confidence: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """{"100%": top-1 on all images, "90%": on the 90% most certain, ...} in percent."""
    accuracy = uncertainty.accuracy_at_coverage(confidence, correct, COVERAGES)
    return {f"{100 * c:g}%": float(100 * a) for c, a in zip(COVERAGES, accuracy)}


def _none_if_nan(value: float) -> float | None:
    """JSON has no NaN: an undefined AUROC (the probe is all right or all wrong) is null."""
    return None if np.isnan(value) else value


def analyze(workdir: str, *, step: int | None = None, predictions: str | None = None,
            output_dir: str | None = None, num_images: int = 16,
            probe_config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """Writes the four figures and uncertainty.json; returns the summary."""
    config = check_vi_simsiam(workdir)
    predictions = linear_probe.find_predictions(workdir, step, predictions, probe_config)
    data = load_predictions(predictions)
    kappa, labels, logits = data["kappa"].astype(np.float64), data["labels"], data["logits"]
    correct = logits.argmax(axis=1) == labels
    max_softmax = uncertainty.max_softmax(logits)
    output_dir = output_dir or os.path.join(workdir, "kappa_analysis")
    os.makedirs(output_dir, exist_ok=True)
    files = {name: os.path.join(output_dir, f"{name}.png")
             for name in ("kappa_histogram", "kappa_extremes", "loss_surface", "risk_coverage")}

    builder = datasets.prepare(config.dataset, data_dir=config.data_dir or None,
                               archive=config.archive or None)
    val = datasets.load_examples(builder, "val")
    position = {str(name): i for i, name in enumerate(val.file_names)}
    missing = [str(n) for n in data["file_names"] if str(n) not in position]
    if missing:
        raise ValueError(f"{predictions} names {len(missing)} images that are not in the "
                         f"validation split of {config.dataset} (e.g. {missing[0]}).")
    descriptions = builder.builder_config.label_descriptions or val.label_names

    num_images = min(num_images, kappa.size // 2)
    order = np.argsort(kappa, kind="stable")

    def entries(rows: np.ndarray) -> list[dict[str, Any]]:
        return [{"file_name": str(data["file_names"][i]), "kappa": float(kappa[i]),
                 "class": descriptions[labels[i]], "probe_correct": bool(correct[i])}
                for i in rows]

    lowest, highest = entries(order[:num_images]), entries(order[::-1][:num_images])
    images = {e["file_name"]: _thumbnail(val.images[position[e["file_name"]]])
              for e in lowest + highest}
    plot_extremes([(f"{num_images} lowest $\\kappa$ (most uncertain)", lowest),
                   (f"{num_images} highest $\\kappa$ (most certain)", highest)],
                  images, files["kappa_extremes"])
    plot_histogram(kappa, lowest[-1]["kappa"], highest[-1]["kappa"], files["kappa_histogram"])

    stats = uncertainty.kappa_stats(kappa)
    kappa_floor = max(config.model.kappa_min, 1e-2)
    plot_loss_surface(np.linspace(-1.0, 1.0, 201),
                      np.geomspace(kappa_floor, max(2 * stats["max"], 10 * kappa_floor), 60),
                      {"floor": kappa_floor, "p5": stats["p5"], "median": stats["p50"],
                       "p95": stats["p95"], "max": stats["max"]}, config.model.dim,
                      files["loss_surface"])

    confidences = {"kappa": kappa, "max softmax (probe)": max_softmax,
                   "oracle": correct.astype(np.float64)}
    curves = {name: uncertainty.risk_coverage(c, correct) for name, c in confidences.items()}
    plot_risk_coverage(curves, float(correct.mean()), files["risk_coverage"])

    summary = {
        "workdir": os.path.abspath(workdir), "step": int(data["step"]),
        "predictions": predictions, "num_val": int(kappa.size), "kappa": stats,
        "kappa_mean_probe_correct": float(kappa[correct].mean()) if correct.any() else None,
        "kappa_mean_probe_wrong": float(kappa[~correct].mean()) if (~correct).any() else None,
        "probe_top1": float(100 * correct.mean()),
        "auroc_kappa": _none_if_nan(uncertainty.auroc(kappa, correct)),
        "auroc_max_softmax": _none_if_nan(uncertainty.auroc(max_softmax, correct)),
        "accuracy_at_coverage": {name: _accuracy_at_coverages(confidences[name], correct)
                                 for name in ("kappa", "max softmax (probe)")},
        "lowest_kappa": lowest, "highest_kappa": highest,
        "files": {**files, "summary": os.path.join(output_dir, "uncertainty.json")},
    }
    with open(summary["files"]["summary"], "w") as f:
        json.dump(summary, f, indent=2)
    return summary
