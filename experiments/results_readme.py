"""Rewrites every generated table of README.md and results/README.md from the JSON under
results/ (tests/test_results_readme.py checks that the documents match it):

    python -m experiments.results_readme

The runs that make the JSON write their own blocks too (`experiments.demo --publish`,
`experiments.reproduce_table1 --readme=results/README.md`); this command regenerates all of them
at once, e.g. after a change to how a table is drawn.
"""

import glob
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from absl import app

from experiments import demo_report, readme_blocks, table1_report
from vi_simsiam_jax import methods
from vi_simsiam_jax.evaluation import ood_report

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def _load(path: pathlib.Path) -> dict:
    with open(path) as f:
        return json.load(f)


def demo_lr_table(results: pathlib.Path) -> str:
    """The demo's learning-rate selection (experiments.tune_lr): local-split top-1 per rate."""
    selection = _load(results / "demo_lr.json")
    rates = sorted(selection["local_val"], key=float)
    return "\n".join([
        "| pretraining lr | " + " | ".join(rates) + " | random init |",
        "| --- " * (len(rates) + 2) + "|",
        "| probe top-1 on local_val (20% of train) | "
        + " | ".join(f"{selection['local_val'][r]['top1']:.2f}" for r in rates)
        + f" | {selection['random_init_local_val']['top1']:.2f} |"]) + "\n"


def _cells(points: list[dict[str, Any]], severities: Sequence[int], value) -> str:
    """'a / b / c': value(point) at each of `severities` ('-' where missing)."""
    by_severity = {p["severity"]: p for p in points}
    return " / ".join(value(by_severity[s]) if s in by_severity else "-" for s in severities)


def ood_markdown(summaries: Sequence[dict[str, Any]],
                    severities: Sequence[int] = (1, 3, 5)) -> str:
    """The README's tables from ood.json summaries: OOD detection (AUROC and FPR at 95% TPR per
    score) and, per corruption, top-1, median kappa and AUROCs at `severities`."""
    header = " | ".join(ood_report.SCORES)
    lines = ["| encoder | probe top-1 | out-of-distribution | " + header + " |",
             "|---" * (3 + len(ood_report.SCORES)) + "|"]
    for s in summaries:
        if "ood" not in s:
            continue
        detection = s["ood"]["detection"]
        scores = [f"{detection[k]['auroc']:.3f} ({detection[k]['fpr_at_95_tpr']:.2f})"
                  if k in detection else "-" for k in ood_report.SCORES]
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


def ood_tables(results: pathlib.Path) -> str:
    """The out-of-distribution and corruption tables of results/ood/*.json."""
    paths = sorted(glob.glob(os.path.join(results, "ood", "*.json")))
    return ood_markdown([_load(pathlib.Path(p)) for p in paths]) + "\n"


def ood_headline(results: pathlib.Path) -> str:
    """The README's small table: AUROC of each score for in- against out-of-distribution val
    images, the encoders with kappa (VI-SimSiam's) of results/ood/*.json."""
    lines = ["| encoder | out-of-distribution | " + " | ".join(
        f"AUROC of {name}" for name in ood_report.SCORES) + " |",
             "|---" * (2 + len(ood_report.SCORES)) + "|"]
    for path in sorted(glob.glob(os.path.join(results, "ood", "*.json"))):
        summary = _load(pathlib.Path(path))
        if "ood" in summary and methods.get(summary["method"]).kappa:
            detection = summary["ood"]["detection"]
            lines.append(f"| {summary['method']}, {summary['dataset']} | "
                         f"{summary['ood']['dataset']} | " + " | ".join(
                             f"{detection[name]['auroc']:.3f}" for name in ood_report.SCORES)
                         + " |")
    return "\n".join(lines) + "\n"


def _size(size: float) -> str:
    """Bytes as GB (MB below 0.1 GB)."""
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _tpu_cases(results: pathlib.Path) -> list[dict[str, Any]]:
    """The cases of results/tpu_compile/*.json (benchmarks.compile_tpu)."""
    return [_load(pathlib.Path(p))
            for p in sorted(glob.glob(os.path.join(results, "tpu_compile", "*.json")))]


def tpu_compile_table(results: pathlib.Path) -> str:
    """Every TPU compilation of results/tpu_compile/*.json (benchmarks.compile_tpu): per case
    the chips, batch, per-chip memory against HBM and the FLOP-count bounds (estimates, not
    measurements)."""
    cases = sorted(_tpu_cases(results),
                   key=lambda c: (c["step"] != "pretrain", c["topology"], c["chips"],
                                  c["images_per_step"], c["precision"]))
    lines = ["| step | topology | chips (hosts) | precision | global / per-chip batch | "
             "per-chip memory / HBM | compile s | images/s: bound at peak, estimate at "
             f"{cases[0]['utilisation']:.0%} | paper run at {cases[0]['utilisation']:.0%} | "
             "XLA's optimal_seconds |" if cases else "| step |", "|---" * 10 + "|"]
    for c in cases:
        memory = c["per_chip_bytes"]["total"]
        hours = c.get("paper_run_hours_at_utilisation")
        largest = c.get("largest_per_chip_batch", {}).get("per_chip_batch")
        lines.append(
            f"| {c['step']} | {c['topology']} | {c['chips']} ({c['hosts']}) | {c['precision']} "
            f"| {c['images_per_step']} / {c['per_chip_batch']}"
            + (f" (fits up to {largest})" if largest else "") + " | "
            f"{_size(memory)} / {_size(c['hbm_bytes'])} | {c['compile_s']:.0f} | "
            f"{c['images_per_s_at_peak']:,.0f}, {c['images_per_s_at_utilisation']:,.0f} | "
            + (f"{hours * 60:.1f} min" if hours is not None else "-") + " | "
            + (f"{c['xla_optimal_seconds']:.2g}" if "xla_optimal_seconds" in c else "-")
            + " |")
    return "\n".join(lines) + "\n"


def tpu_compile_headline(results: pathlib.Path, generation: str = "v5e") -> str:
    """README's summary of the pretraining compilations on `generation`'s topologies: one row
    per topology and batch, float32 / bfloat16 side by side (estimates, not measurements)."""
    cases = [c for c in _tpu_cases(results)
             if c["step"] == "pretrain" and c["topology"].startswith(generation)]
    rows: dict[tuple, dict[str, dict]] = {}
    for c in sorted(cases, key=lambda c: (c["chips"], c["images_per_step"])):
        rows.setdefault((c["topology"], c["chips"], c["hosts"], c["images_per_step"],
                         c["per_chip_batch"]), {})[c["precision"]] = c

    def both(by_precision: dict[str, dict], value: Callable[[dict], str]) -> str:
        return " / ".join(value(by_precision[p]) if p in by_precision else "-"
                          for p in ("float32", "bfloat16"))

    utilisation = f"{cases[0]['utilisation']:.0%}" if cases else ""
    lines = ["| topology | chips (hosts) | global / per-chip batch | per-chip memory, float32 / "
             f"bfloat16, of HBM | images/s at {utilisation} of peak | paper's 200 epochs at "
             f"{utilisation} |", "|---|---|---|---|---|---|"]
    for (topology, chips, hosts, batch, per_chip), by_precision in rows.items():
        hbm = _size(next(iter(by_precision.values()))["hbm_bytes"])
        lines.append(
            f"| {topology} | {chips} ({hosts}) | {batch} / {per_chip} | "
            + both(by_precision, lambda c: _size(c["per_chip_bytes"]["total"])) + f" of {hbm} | "
            + both(by_precision, lambda c: f"{c['images_per_s_at_utilisation']:,.0f}") + " | "
            + both(by_precision, lambda c: f"{c['paper_run_hours_at_utilisation'] * 60:.1f} min")
            + " |")
    return "\n".join(lines) + "\n"


# (document, block name, the block's contents from the results folder)
BLOCKS: list[tuple[pathlib.Path, str, Callable[[pathlib.Path], str]]] = [
    (REPO / "README.md", demo_report.README_BLOCK,
     lambda results: demo_report.markdown(_load(results / "demo" / "report.json"))),
    (REPO / "README.md", "table1_headline", lambda results: table1_report.headline(
        table1_report.summarize(str(results / "table1")))),
    (REPO / "README.md", "ood_headline", ood_headline),
    (RESULTS / "README.md", "demo_lr", demo_lr_table),
    (RESULTS / "README.md", "table1", lambda results: table1_report.markdown(
        table1_report.summarize(str(results / "table1")))),
    (RESULTS / "README.md", "ood", ood_tables),
    (REPO / "README.md", "tpu_compile_headline", tpu_compile_headline),
    (REPO / "benchmarks" / "README.md", "tpu_compile", tpu_compile_table),
]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for document, name, contents in BLOCKS:
        readme_blocks.write(str(document), name, contents(RESULTS))
        print(f"{document.relative_to(REPO)}: block {name}")


if __name__ == "__main__":
    app.run(main)
