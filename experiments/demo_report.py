"""The README's demo block, made from the demo's report.json (`experiments.demo --publish`
writes it; tests/test_results_readme.py checks it against results/demo/report.json)."""

import textwrap
from typing import Any

from vi_simsiam_jax import methods

README_BLOCK = "demo"
PUBLISHED_FILES = ("report.json", "probe.json", "probe_random_init.json",
                   "kappa_analysis/uncertainty.json")


def markdown(report: dict[str, Any]) -> str:
    """The table of both probes and a paragraph of the run's figures."""
    probe, baseline, kappa = report["probe"], report["baseline"], report["kappa"]
    config, timings, pretrain = report["config"], report["timings_s"], report["pretrain"]
    name = methods.get(config["method"]).title
    rows = [f"| {name}, {config['num_epochs']} epochs, lr {config['learning_rate']:g} | "
            f"{probe['top1']:.2f} | {probe['top5']:.2f} | {probe['knn_top1']:.2f} |",
            f"| same encoder at random init | {baseline['top1']:.2f} | {baseline['top5']:.2f} "
            f"| {baseline['knn_top1']:.2f} |"]
    stats = kappa["kappa"]
    paragraph = textwrap.fill(
        f"The probe is {probe['top1'] - baseline['top1']:.1f} points above the random-init "
        f"encoder (the demo's target: at least 10), kNN "
        f"{probe['knn_top1'] - baseline['knn_top1']:.1f}. Median kappa on val: "
        f"{stats['p50']:.1f} (range {stats['min']:.0f}-{stats['max']:.0f}); kappa ranks the "
        f"probe's right answers above its wrong ones with AUROC {kappa['auroc_kappa']:.2f}, "
        f"against {kappa['auroc_max_softmax']:.2f} for the probe's own max-softmax. At the end "
        f"of pretraining the batch-mean kappa was {pretrain['kappa_mean']:.0f} and cos(p, z) "
        f"{pretrain['cosine']:.2f}. "
        f"Pretraining took {timings['pretrain_s'] / 60:.1f} min ({pretrain['step']} steps, "
        f"{timings['pretrain_s'] / pretrain['step']:.2f} s per step with the compilation), "
        f"both probes {timings['probe_s']:.0f} s, the kappa analysis "
        f"{timings['analysis_s']:.0f} s.", width=96)
    return "\n".join([
        "| `runs/demo/report.json` (kept in `results/demo/`) | top-1 | top-5 | kNN top-1 |",
        "| --- | --- | --- | --- |", *rows, "", paragraph, ""])
