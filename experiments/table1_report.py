"""Table 1 at CPU scale, computed from its run records (written by experiments.reproduce_table1).

Records in the results folder: `select_<dataset>_<method>.json` (the local-split selection on
that dataset: every candidate's scores and collapse monitor, and the choice),
`<dataset>_<method>_seed<k>.json` (a pretraining run probed on val) and
`<dataset>_random_init_seed<k>.json`; in `sensitivity/`, `<dataset>_simsiam_seed<k>.json`: SimSiam
at another learning rate than its selection chose (the confirmatory protocol's sensitivity arm,
experiments.confirm_table1). From them: per cell mean +- std over seeds, the paired difference
VI-SimSiam - SimSiam (same seed) with its 95% t interval, the exact Wilcoxon signed-rank p and a
paired bootstrap interval, the t interval with each seed left out and over the confirmation
seeds alone, each method's gain over the random-init encoder of the same seed against the
learning targets, and each run's scores with its collapse monitor (z_std during pretraining).
The same for VI-SimSiam against the sensitivity arm.
"""

import glob
import json
import os
from typing import Any

import numpy as np

from vi_simsiam_jax.evaluation import statistics

METHOD_NAMES = {"simsiam": "SimSiam", "vi_simsiam": "VI-SimSiam", "random_init": "random init"}
METRICS = {"top1": "top-1", "top5": "top-5", "knn_top1": "kNN top-1"}
# Gain over the random-init encoder (points) at which a method counts as having learned.
TARGETS = {"top1": 10.0, "knn_top1": 5.0}
# A run whose projections' z_std fell below this during pretraining counts as (partly) collapsed.
COLLAPSE_Z_STD = 0.5
# The seeds the confirmatory protocol added to the six-seed table (experiments.confirm_table1).
CONFIRMATION_SEEDS = tuple(range(6, 12))
# Where the sensitivity arm's records lie inside the results folder.
SENSITIVITY_DIR = "sensitivity"
# The paper's Table 1: linear-probe (top-1, top-5) in %, ResNet-18, 200 epochs.
PAPER = {"imagenette": {"simsiam": (88.223, 98.236), "vi_simsiam": (90.650, 99.389)},
         "imagewoof": {"simsiam": (72.410, 97.480), "vi_simsiam": (78.468, 98.066)}}


def dataset_name(dataset: str) -> str:
    """A config.dataset as it appears in file names and tables (a folder: its base name)."""
    return os.path.basename(os.path.normpath(dataset))


def record_path(results_dir: str, dataset: str, method: str, seed: int) -> str:
    """The record of one run; method "random_init" for the untrained encoder of that seed."""
    return os.path.join(results_dir, f"{dataset_name(dataset)}_{method}_seed{seed}.json")


def selection_path(results_dir: str, dataset: str, method: str) -> str:
    return os.path.join(results_dir, f"select_{dataset_name(dataset)}_{method}.json")


def _load(pattern: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            records.append(json.load(f))
    return records


def load_runs(results_dir: str) -> list[dict[str, Any]]:
    """The table's run records (pretrained and random-init), by file name."""
    return _load(os.path.join(results_dir, "*_seed*.json"))


def load_selections(results_dir: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The selection record of each (dataset, method)."""
    return {(record["dataset"], record["method"]): record
            for record in _load(os.path.join(results_dir, "select_*.json"))}


def collapse_monitor(curves: list[dict[str, Any]]) -> dict[str, float] | None:
    """z_std over a pretraining run (about 1 for spread-out projections, 0 for collapsed ones):
    its lowest value, the step of that value, and its final value."""
    rows = [row for row in curves if "z_std" in row]
    if not rows:
        return None
    lowest = min(rows, key=lambda row: row["z_std"])
    return {"lowest": lowest["z_std"], "lowest_step": lowest["step"],
            "final": rows[-1]["z_std"]}


def _scores(record: dict[str, Any]) -> dict[str, Any]:
    """One run's probe scores, settings and collapse monitor."""
    return {**{metric: record["probe"][metric] for metric in METRICS},
            "learning_rate": record.get("learning_rate"), "num_epochs": record.get("num_epochs"),
            "z_std": collapse_monitor(record.get("curves", []))}


def _runs_by_cell(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, Any]]]:
    """dataset -> method -> seed -> `_scores`."""
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for record in records:
        runs.setdefault(record["dataset"], {}).setdefault(record["method"], {})[
            record["seed"]] = _scores(record)
    return runs


def direction(interval: list[float]) -> str:
    """Which way a VI-SimSiam - SimSiam interval points: "ahead", "behind" or "not resolved"."""
    low, high = interval
    return "ahead" if low > 0 else "behind" if high < 0 else "not resolved"


def compare(vi_simsiam: dict[int, dict[str, Any]], simsiam: dict[int, dict[str, Any]]
            ) -> dict[str, Any]:
    """VI-SimSiam - SimSiam paired by seed for every metric; for top-1 (the primary measure)
    also the t interval with each seed left out and over the confirmation seeds alone."""
    def paired(metric: str, seeds: set[int], summary=statistics.paired_difference
               ) -> dict[str, Any]:
        return summary({seed: r[metric] for seed, r in vi_simsiam.items() if seed in seeds},
                       {seed: r[metric] for seed, r in simsiam.items() if seed in seeds})

    seeds = set(vi_simsiam) & set(simsiam)
    result = {metric: paired(metric, seeds) for metric in METRICS}
    if len(seeds) > 2:
        left_out = {seed: paired("top1", seeds - {seed}, statistics.paired_t)["interval"]
                    for seed in sorted(seeds)}
        result["top1"]["leave_one_out"] = {
            "changes_verdict": [seed for seed, interval in left_out.items()
                                if direction(interval) != direction(result["top1"]["interval"])],
            "intervals": {str(seed): interval for seed, interval in left_out.items()}}
    confirmation = seeds & set(CONFIRMATION_SEEDS)
    if confirmation:
        result["top1"]["confirmation_seeds"] = paired("top1", confirmation)
    return result


def collapsed(runs: dict[int, dict[str, Any]]) -> list[int]:
    """The seeds whose lowest z_std fell below COLLAPSE_Z_STD."""
    return sorted(seed for seed, run in runs.items()
                  if run["z_std"] and run["z_std"]["lowest"] < COLLAPSE_Z_STD)


def summarize(results_dir: str) -> dict[str, Any]:
    """The table's numbers from every record in results_dir (partial tables included)."""
    runs = _runs_by_cell(load_runs(results_dir))
    cells, differences, gains = {}, {}, {}
    for dataset, methods in runs.items():
        cells[dataset] = {
            method: {metric: statistics.mean_std([r[metric] for r in methods[method].values()])
                     for metric in METRICS}
            for method in METHOD_NAMES if method in methods}
        if {"simsiam", "vi_simsiam"} <= set(methods) and (set(methods["simsiam"])
                                                           & set(methods["vi_simsiam"])):
            differences[dataset] = compare(methods["vi_simsiam"], methods["simsiam"])
        gains[dataset] = {}
        for method in ("simsiam", "vi_simsiam"):
            if method in methods and set(methods[method]) & set(methods.get("random_init", {})):
                gains[dataset][method] = {}
                for metric, target in TARGETS.items():
                    gain = statistics.paired_difference(
                        {seed: r[metric] for seed, r in methods[method].items()},
                        {seed: r[metric] for seed, r in methods["random_init"].items()})
                    gains[dataset][method][metric] = {**gain, "target": target,
                                                      "met": gain["mean"] >= target}
    sensitivity = {}
    for dataset, methods in _runs_by_cell(
            load_runs(os.path.join(results_dir, SENSITIVITY_DIR))).items():
        simsiam, vi_simsiam = methods["simsiam"], runs.get(dataset, {}).get("vi_simsiam", {})
        sensitivity[dataset] = {
            "cell": {metric: statistics.mean_std([r[metric] for r in simsiam.values()])
                     for metric in METRICS},
            "runs": simsiam, "collapsed": collapsed(simsiam)}
        if set(simsiam) & set(vi_simsiam):
            sensitivity[dataset]["differences"] = compare(vi_simsiam, simsiam)
    selection = {
        f"{dataset}/{method}": {
            "dataset": dataset, "method": method, "seed": record["seed"],
            "chosen": record.get("chosen"),
            "random_init_local_val_top1": record.get("random_init", {}).get("top1"),
            "candidates": [{"learning_rate": c["learning_rate"], "num_epochs": c["num_epochs"],
                            **{f"local_val_{m}": c["probe"][m] if c["probe"] else None
                               for m in METRICS},
                            "z_std": collapse_monitor(c.get("curves", []))}
                           for c in record["candidates"]]}
        for (dataset, method), record in load_selections(results_dir).items()}
    return {"runs": runs, "cells": cells, "differences": differences, "gains": gains,
            "collapsed": {dataset: {method: collapsed(methods[method])
                                    for method in ("simsiam", "vi_simsiam") if method in methods}
                          for dataset, methods in runs.items()},
            "sensitivity": sensitivity, "selection": selection,
            "compute": compute_used(results_dir)}


def pretraining_seconds(record: dict[str, Any]) -> float:
    """A run's pretraining time: its steps x the median logged time per step (robust to the
    compilation, pauses and other jobs on the machine)."""
    batch_size = record["config"]["batch_size"]
    per_step = np.median([batch_size / row["images_per_sec"] for row in record["curves"]
                          if row.get("images_per_sec")])
    return float(record["curves"][-1]["step"] * per_step)


def compute_used(results_dir: str) -> dict[str, float]:
    """Pretraining time over every distinct run (selection candidates, table runs and the
    sensitivity arm)."""
    runs = {c["workdir"]: c for record in load_selections(results_dir).values()
            for c in record["candidates"] if c.get("curves")}
    runs.update((r["workdir"], r) for r in load_runs(results_dir)
                + load_runs(os.path.join(results_dir, SENSITIVITY_DIR))
                if r["method"] != "random_init")
    return {"pretraining_runs": len(runs),
            "pretraining_hours": sum(map(pretraining_seconds, runs.values())) / 3600}


def _mean_std(summary: dict[str, float]) -> str:
    if summary["n"] < 2:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def _interval(summary: dict[str, Any]) -> str:
    low, high = summary["interval"]
    if summary["n"] < 2:
        return f"{summary['mean']:+.2f}"
    return f"{summary['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _run(run: dict[str, Any] | None) -> str:
    if run is None:
        return ""
    text = f"{run['top1']:.2f} / {run['knn_top1']:.2f}"
    z_std = run["z_std"]
    if z_std:
        text += (f"; z_std {z_std['lowest']:.2f} @ {z_std['lowest_step']} → "
                 f"{z_std['final']:.2f}")
        if z_std["lowest"] < COLLAPSE_Z_STD:
            text += " (collapsed)"
    return text


def _paper_difference(dataset: str, metric: int = 0) -> float | None:
    """The paper's VI-SimSiam - SimSiam on a dataset (metric 0: top-1, 1: top-5), if it has one."""
    paper = PAPER.get(dataset)
    return paper["vi_simsiam"][metric] - paper["simsiam"][metric] if paper else None


def _settings(runs: dict[int, dict[str, Any]]) -> str:
    """The learning rate(s) and epochs a cell's runs used."""
    return ", ".join(f"lr {lr:g} x {epochs} epochs" for lr, epochs in
                     sorted({(r["learning_rate"], r["num_epochs"]) for r in runs.values()}))


def _rates(runs: dict[int, dict[str, Any]]) -> str:
    return ", ".join(f"{lr:g}" for lr in sorted({r["learning_rate"] for r in runs.values()}))


WORDS = {"ahead": "the interval excludes 0: VI-SimSiam is ahead of SimSiam",
         "behind": "the interval excludes 0: SimSiam is ahead of VI-SimSiam",
         "not resolved": "the interval contains 0: the difference is not resolved"}
SHORT = {"ahead": "VI-SimSiam ahead", "behind": "SimSiam ahead", "not resolved": "not resolved"}


def _seeds(seeds: list[int]) -> str:
    """"none", "seed 3" or "seeds 0, 2, 4"."""
    if not seeds:
        return "none"
    return f"seed{'s' if len(seeds) > 1 else ''} " + ", ".join(map(str, seeds))


def _left_out(seeds: list[int]) -> str:
    """"seed 3 left out" or "any one of seeds 0, 2 left out"."""
    return f"{'' if len(seeds) == 1 else 'any one of '}{_seeds(seeds)} left out"


def _checks(top1: dict[str, Any]) -> str:
    """The primary difference's robustness: Wilcoxon, bootstrap, leave-one-out, fresh seeds."""
    low, high = top1["bootstrap_interval"]
    text = (f"Wilcoxon signed-rank p = {top1['wilcoxon_p']:.4f} (exact), paired bootstrap 95% "
            f"CI [{low:+.2f}, {high:+.2f}]")
    if "leave_one_out" in top1:
        changes = top1["leave_one_out"]["changes_verdict"]
        text += ("; the verdict holds with any one seed left out" if not changes else
                 f"; the verdict changes with {_left_out(changes)}")
    verdict = direction(top1["interval"])
    if verdict != "not resolved" and (top1["wilcoxon_p"] >= 0.05 or direction(
            top1["bootstrap_interval"]) != verdict):
        text += ("; the Wilcoxon p or the bootstrap disagrees: the verdict rests on the t "
                 "interval alone")
    confirmation = top1.get("confirmation_seeds")
    if confirmation and confirmation["n"] > 1:
        text += (f"; seeds {CONFIRMATION_SEEDS[0]}-{CONFIRMATION_SEEDS[-1]} alone "
                 f"({confirmation['n']}): {_interval(confirmation)}")
    return text


def _sensitivity(dataset: str, summary: dict[str, Any]) -> str:
    """The sensitivity arm's sentences in its dataset's verdict."""
    arm = summary["sensitivity"][dataset]
    settings = _settings(arm["runs"])
    top1 = arm.get("differences", {}).get("top1")
    if top1 is None or top1["n"] < 2:
        return f" Sensitivity arm (SimSiam {settings}): no interval yet."
    main = direction(summary["differences"][dataset]["top1"]["interval"])
    here = direction(top1["interval"])
    so = ("so the verdict holds at both SimSiam rates" if here == main else
          f"so the {dataset} verdict depends on SimSiam's learning rate")
    return (f" Sensitivity arm, SimSiam at {settings} ({top1['n']} paired seeds): VI-SimSiam − "
            f"SimSiam top-1 {_interval(top1)}; {WORDS[here]}; {_checks(top1)}; collapsed "
            f"SimSiam runs: {_seeds(arm['collapsed'])}; {so}.")


def verdict(dataset: str, summary: dict[str, Any]) -> str:
    """One dataset in a paragraph: the settings, which way the paired top-1 interval points,
    whether it holds the paper's difference, its robustness checks, kNN, the collapsed runs, the
    sensitivity arm (if the dataset has one) and the learning targets per method."""
    top1, knn = (summary["differences"][dataset][m] for m in ("top1", "knn_top1"))
    if top1["n"] < 2:
        return f"**{dataset}**: {top1['n']} paired seed, no interval yet."
    runs = summary["runs"][dataset]
    settings = "; ".join(f"{METHOD_NAMES[m]} {_settings(runs[m])}"
                         for m in ("simsiam", "vi_simsiam"))
    low, high = top1["interval"]
    text = (f"**{dataset}** ({top1['n']} paired seeds; {settings}): VI-SimSiam − SimSiam "
            f"linear-probe top-1 {_interval(top1)}; {WORDS[direction(top1['interval'])]}")
    paper = _paper_difference(dataset)
    if paper is not None:
        holds = "contains" if low <= paper <= high else "does not contain"
        text += f"; it {holds} the paper's {paper:+.2f}"
    text += f". {_checks(top1)}. kNN top-1: {_interval(knn)}."
    text += (f" Collapsed runs (lowest z_std below {COLLAPSE_Z_STD:g}): " + "; ".join(
        f"{METHOD_NAMES[method]} {_seeds(seeds)}"
        for method, seeds in summary["collapsed"][dataset].items()) + ".")
    if dataset in summary["sensitivity"]:
        text += _sensitivity(dataset, summary)
    gains = summary["gains"].get(dataset, {})
    if gains:
        text += (" Learning targets (gain over the random-init encoder of the same seed: "
                 f"top-1 +{TARGETS['top1']:g}, kNN +{TARGETS['knn_top1']:g}): " + "; ".join(
                     f"{METHOD_NAMES[method]} " + ", ".join(
                         f"{'met' if gain[m]['met'] else 'missed'} {METRICS[m]} "
                         f"({gain[m]['mean']:+.2f})" for m in TARGETS)
                     for method, gain in gains.items()) + ".")
    return text


def comparisons(summary: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(dataset, SimSiam's learning rates, VI-SimSiam - SimSiam per metric) of the table, then
    of the sensitivity arm."""
    rows = [(dataset, _rates(summary["runs"][dataset]["simsiam"]), difference)
            for dataset, difference in summary["differences"].items()]
    rows += [(dataset, f"{_rates(arm['runs'])} (sensitivity)", arm["differences"])
             for dataset, arm in summary["sensitivity"].items() if "differences" in arm]
    return rows


def _robustness_cells(top1: dict[str, Any]) -> str:
    if top1["n"] < 2:
        return " |  |"
    low, high = top1["bootstrap_interval"]
    return f" [{low:+.2f}, {high:+.2f}] | {top1['wilcoxon_p']:.4f} |"


def _short(top1: dict[str, Any]) -> str:
    """The verdict in a few words, marked where leaving one seed out changes it: the README's
    line names no claim that fails that check without saying so."""
    verdict = direction(top1["interval"])
    changes = top1.get("leave_one_out", {}).get("changes_verdict")
    if verdict == "not resolved" or not changes:
        return SHORT[verdict]
    return f"{SHORT[verdict]} (changes with {_left_out(changes)})"


def headline(summary: dict[str, Any]) -> str:
    """The README's Table 1: the verdict in one line, top-1 of both methods, their paired
    difference with its checks (the sensitivity arm's too), and the verdict on each dataset."""
    verdicts = []
    for dataset, difference in summary["differences"].items():
        if difference["top1"]["n"] < 2:
            continue
        text = f"{dataset}: {_short(difference['top1'])}"
        arm = summary["sensitivity"].get(dataset, {}).get("differences", {}).get("top1")
        if arm and arm["n"] > 1:
            rates = _rates(summary["runs"][dataset]["simsiam"])
            text += (f" with SimSiam at lr {rates}, {_short(arm)} at lr "
                     f"{_rates(summary['sensitivity'][dataset]['runs'])}")
            if direction(arm["interval"]) != direction(difference["top1"]["interval"]):
                text += " (the verdict depends on SimSiam's learning rate)"
        verdicts.append(text)
    lines = ["**Verdict** (VI-SimSiam − SimSiam, linear-probe top-1, 95% t interval): "
             + "; ".join(verdicts) + ".", "",
             "| dataset | SimSiam lr | seeds | SimSiam top-1 | VI-SimSiam top-1 | VI-SimSiam − "
             "SimSiam [95% t CI] | bootstrap 95% CI | Wilcoxon p | the paper's difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset, rates, difference in comparisons(summary):
        simsiam = (summary["sensitivity"][dataset]["cell"] if "sensitivity" in rates
                   else summary["cells"][dataset]["simsiam"])
        paper = _paper_difference(dataset)
        paper = "" if paper is None else f"{paper:+.2f}"
        lines.append(f"| {dataset} | {rates} | {difference['top1']['n']} | "
                     f"{_mean_std(simsiam['top1'])} | "
                     f"{_mean_std(summary['cells'][dataset]['vi_simsiam']['top1'])} | "
                     f"{_interval(difference['top1'])} |"
                     + _robustness_cells(difference["top1"]) + f" {paper} |")
    lines += ["", "Linear-probe top-1, mean ± sd over seeds; the difference paired by seed with "
              "its 95% t interval (the primary measure), its BCa bootstrap interval and the "
              "exact Wilcoxon signed-rank p.", ""]
    lines.append("\n\n".join(verdict(dataset, summary) for dataset in summary["differences"]))
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, Any]) -> str:
    """The table, the paired differences and the learning targets as markdown."""
    lines = ["| dataset | method | seeds | top-1 | top-5 | kNN top-1 | paper top-1 / top-5 |",
             "|---|---|---|---|---|---|---|"]
    for dataset, cells in summary["cells"].items():
        for method, cell in cells.items():
            paper = PAPER.get(dataset, {}).get(method)
            paper = f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else ""
            lines.append(f"| {dataset} | {METHOD_NAMES[method]} | {cell['top1']['n']} | " +
                         " | ".join(_mean_std(cell[m]) for m in METRICS) + f" | {paper} |")
        if dataset in summary["differences"]:
            difference = summary["differences"][dataset]
            paper = ("" if dataset not in PAPER else " / ".join(
                f"{_paper_difference(dataset, metric):+.2f}" for metric in (0, 1)))
            lines.append(f"| {dataset} | VI-SimSiam − SimSiam, mean [95% CI] | "
                         f"{difference['top1']['n']} | " +
                         " | ".join(_interval(difference[m]) for m in METRICS) + f" | {paper} |")
        arm = summary["sensitivity"].get(dataset)
        if arm:
            name = f"SimSiam lr {_rates(arm['runs'])} (sensitivity)"
            lines.append(f"| {dataset} | {name} | {arm['cell']['top1']['n']} | " +
                         " | ".join(_mean_std(arm["cell"][m]) for m in METRICS) + " |  |")
            if "differences" in arm:
                lines.append(f"| {dataset} | VI-SimSiam − {name}, mean [95% CI] | "
                             f"{arm['differences']['top1']['n']} | " + " | ".join(
                                 _interval(arm["differences"][m]) for m in METRICS) + " |  |")
    rows = comparisons(summary)
    if rows:
        lines += ["", "The primary measure's checks (VI-SimSiam − SimSiam, linear-probe top-1, "
                  "paired by seed):", "",
                  "| dataset | SimSiam lr | seeds | mean [95% t CI] | bootstrap 95% CI | "
                  "Wilcoxon p | verdict changes with seed left out | seeds "
                  f"{CONFIRMATION_SEEDS[0]}-{CONFIRMATION_SEEDS[-1]} alone |",
                  "|---|---|---|---|---|---|---|---|"]
        for dataset, rates, difference in rows:
            top1 = difference["top1"]
            changes = top1.get("leave_one_out", {}).get("changes_verdict")
            confirmation = top1.get("confirmation_seeds")
            lines.append(f"| {dataset} | {rates} | {top1['n']} | {_interval(top1)} |"
                         + _robustness_cells(top1)
                         + f" {'' if changes is None else _seeds(changes)} | "
                         + (_interval(confirmation) if confirmation else "") + " |")
        lines += ["", "VI-SimSiam − SimSiam, paired by seed, mean [95% CI]:", ""]
        lines.append("\n\n".join(verdict(dataset, summary) for dataset in summary["differences"]))
    lines += ["", "Gain over the random-init encoder of the same seed, mean [95% CI], against "
              "the targets (top-1 +10, kNN +5):", "",
              "| dataset | method | top-1 gain | kNN top-1 gain | targets met |",
              "|---|---|---|---|---|"]
    for dataset, methods in summary["gains"].items():
        for method, gain in methods.items():
            met = [METRICS[m] for m in TARGETS if gain[m]["met"]]
            lines.append(f"| {dataset} | {METHOD_NAMES[method]} | {_interval(gain['top1'])} | "
                         f"{_interval(gain['knn_top1'])} | {', '.join(met) or 'neither'} |")
    lines += ["", "Per run: linear-probe top-1 / kNN top-1, and the collapse monitor z_std "
              "(lowest during pretraining @ step → final; collapsed: lowest below "
              f"{COLLAPSE_Z_STD:g}):", "",
              "| dataset | seed | " + " | ".join(METHOD_NAMES.values())
              + (" | SimSiam, sensitivity arm" if summary["sensitivity"] else "") + " |",
              "|---|---|" + "---|" * (len(METHOD_NAMES) + bool(summary["sensitivity"]))]
    for dataset, methods in summary["runs"].items():
        arm = summary["sensitivity"].get(dataset, {}).get("runs", {})
        for seed in sorted({seed for seeds in [*methods.values(), arm] for seed in seeds}):
            cells = [_run(methods[method].get(seed)) if method in methods else ""
                     for method in METHOD_NAMES]
            if summary["sensitivity"]:
                cells.append(_run(arm.get(seed)))
            lines.append(f"| {dataset} | {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Chosen on the local split (linear-probe top-1 on 20% of train, the head fit on "
              "the other 80%; no val image):", ""]
    for selection in summary["selection"].values():
        scores = ", ".join(f"lr {c['learning_rate']:g} × {c['num_epochs']} ep: " + (
            f"{c['local_val_top1']:.2f}" if c["local_val_top1"] is not None else "diverged")
            for c in selection["candidates"])
        chosen = selection.get("chosen")
        chosen = (f"lr {chosen['learning_rate']:g}, {chosen['num_epochs']} epochs" if chosen
                  else "not yet chosen")
        random_init = selection["random_init_local_val_top1"]
        if random_init is not None:
            scores += f"; random init: {random_init:.2f}"
        lines.append(f"- {METHOD_NAMES[selection['method']]} on {selection['dataset']}, seed "
                     f"{selection['seed']}: {chosen} ({scores}).")
    compute = summary["compute"]
    lines += ["", f"Pretraining compute: {compute['pretraining_runs']} runs, "
              f"{compute['pretraining_hours']:.1f} hours (steps x the median logged time per "
              "step; probes not counted)."]
    return "\n".join(lines) + "\n"
