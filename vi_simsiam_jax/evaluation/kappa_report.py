"""What VI-SimSiam's predicted kappa captures on the probe's scored images (paper Sec. 6.3):
its statistics, the lowest- and highest-kappa images, and kappa as a score for "the probe is
right" (AUROC, accuracy at coverage) next to the probe's own max softmax. Pure computation on a
`linear_probe.ProbeResult`; experiments/analyze_kappa.py and experiments.demo write its JSON and
figures (experiments/figures.py)."""

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from vi_simsiam_jax import methods
from vi_simsiam_jax.evaluation import linear_probe, uncertainty

COVERAGES = (1.0, 0.9, 0.75, 0.5)


def check_kappa(config: ml_collections.ConfigDict, workdir: str) -> None:
    """ValueError unless the pretraining config's method predicts kappa (`methods.Method.kappa`,
    e.g. VI-SimSiam)."""
    if not methods.get(config.method).kappa:
        with_kappa = " or ".join(repr(m.name) for m in methods.REGISTRY.values() if m.kappa)
        raise ValueError(
            f"{workdir} was pretrained with method={config.method!r}: kappa exists only for "
            f"method={with_kappa} (the predictor's extra output, paper Sec. 6.2), so there is "
            "nothing to analyse.")


def confidences(probe: linear_probe.ProbeResult) -> dict[str, np.ndarray]:
    """The per-image confidences compared: kappa, the probe's max softmax, and an oracle."""
    correct = probe.logits.argmax(axis=1) == probe.scored.labels
    return {"kappa": probe.scored.kappa.astype(np.float64),
            "max softmax (probe)": uncertainty.max_softmax(probe.logits),
            "oracle": correct.astype(np.float64)}


def _accuracy_at_coverages(confidence: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """{"100%": top-1 on all images, "90%": on the 90% most certain, ...} in percent."""
    accuracy = uncertainty.accuracy_at_coverage(confidence, correct, COVERAGES)
    return {f"{100 * c:g}%": float(100 * a) for c, a in zip(COVERAGES, accuracy)}


def _none_if_nan(value: float) -> float | None:
    """JSON has no NaN: an undefined AUROC (the probe is all right or all wrong) is null."""
    return None if np.isnan(value) else value


def analyze(probe: linear_probe.ProbeResult, descriptions: Sequence[str],
            num_images: int = 16) -> dict[str, Any]:
    """The JSON-ready summary of kappa on the probe's scored images; `descriptions` names the
    classes. ValueError if the encoder predicts no kappa (its method has none, e.g. SimSiam)."""
    if probe.scored.kappa is None:
        raise ValueError("The probed encoder predicts no kappa (its method has none, e.g. "
                         "SimSiam).")
    scores = confidences(probe)
    kappa, max_softmax = scores["kappa"], scores["max softmax (probe)"]
    correct = scores["oracle"] > 0
    labels = probe.scored.labels
    file_names = probe.scored_examples.file_names[probe.scored.index]
    num_images = min(num_images, kappa.size // 2)
    order = np.argsort(kappa, kind="stable")

    def entries(rows: np.ndarray) -> list[dict[str, Any]]:
        return [{"file_name": str(file_names[i]), "kappa": float(kappa[i]),
                 "class": descriptions[labels[i]], "probe_correct": bool(correct[i])}
                for i in rows]

    return {
        "step": probe.metrics["step"], "num_val": int(kappa.size),
        "kappa": uncertainty.kappa_stats(kappa),
        "kappa_mean_probe_correct": float(kappa[correct].mean()) if correct.any() else None,
        "kappa_mean_probe_wrong": float(kappa[~correct].mean()) if (~correct).any() else None,
        "probe_top1": float(100 * correct.mean()),
        "auroc_kappa": _none_if_nan(uncertainty.auroc(kappa, correct)),
        "auroc_max_softmax": _none_if_nan(uncertainty.auroc(max_softmax, correct)),
        "accuracy_at_coverage": {name: _accuracy_at_coverages(scores[name], correct)
                                 for name in ("kappa", "max softmax (probe)")},
        "lowest_kappa": entries(order[:num_images]),
        "highest_kappa": entries(order[::-1][:num_images]),
    }
