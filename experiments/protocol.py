"""The selection protocol shared by experiments.tune_lr, experiments.reproduce_table1 and
experiments.confirm_table1, and Table 1's report files.

Hyper-parameters are chosen by the linear probe on the local split of train (paper Sec. 6.1: the
head is fit on 80% of train and scored on the other 20%; no val image is encoded); val is read
once, for the reported numbers. A record of every run holds what a reader needs to check it:
scores, per-step training curves, the config and the git commit.
"""

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from experiments import readme_blocks, reporting, table1_report
from experiments.reporting import git_commit, relative_to_repo
from vi_simsiam_jax import loop

SCORES = ("top1", "top5", "knn_top1", "learning_rate", "lr_sweep_local_val_top1")
# The training-curve fields kept from metrics.jsonl (kappa only for the VI methods).
CURVE_FIELDS = ("step", "epoch", "loss", "cosine", "kappa_mean", "kappa_std", "z_std",
                "learning_rate", "images_per_sec")


def local_probe_config(probe_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """probe_config scored on the local split (its lr_sweep's best head) instead of val."""
    config = ml_collections.ConfigDict(probe_config.to_dict())
    config.eval_split = "local_val"
    return config


def probe_scores(workdir: str, probe_config: ml_collections.ConfigDict,
                 random_init: bool = False) -> dict[str, Any]:
    """The probe's scores for a pretraining workdir, read from its output if already run."""
    output = reporting.probe_output(workdir, random_init=random_init,
                                    eval_split=probe_config.eval_split)
    if os.path.exists(output):
        with open(output) as f:
            result = json.load(f)
    else:
        _, _, result = reporting.probe(workdir, probe_config, random_init=random_init,
                                       output=output)
    return {key: result.get(key) for key in SCORES}


def training_curves(workdir: str) -> list[dict[str, float]]:
    """The logged training metrics of a workdir (every log_every_steps), CURVE_FIELDS only, one
    row per step in step order: a step logged again after a resume keeps its last row."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = {row["step"]: row for row in map(json.loads, f) if "loss" in row}
    return [{k: row[k] for k in CURVE_FIELDS if k in row} for _, row in sorted(rows.items())]


def choose_learning_rate(grid: Sequence[float], score: Callable[[float], float],
                         factor: float = 2.0, max_extensions: int = 3) -> float:
    """The learning rate of best score, the grid extended while its edge scores best.

    Every rate of `grid` is scored; while the best is the lowest (highest) rate scored, the
    next rate below (above), a `factor` away, is scored too, at most `max_extensions` times
    on each side. A failed run scores -inf (`score` returns it). Ties go to the lower rate.
    """
    rates = sorted(grid)
    scores = {rate: score(rate) for rate in rates}
    extended = {"low": 0, "high": 0}
    while True:
        best = max(rates, key=lambda rate: (scores[rate], -rate))
        if best == rates[0] and extended["low"] < max_extensions:
            side, rate = "low", rates[0] / factor
        elif best == rates[-1] and extended["high"] < max_extensions:
            side, rate = "high", rates[-1] * factor
        else:
            return best
        if not math.isfinite(scores[best]):
            return best  # nothing trained: extending would not tell the rates apart
        extended[side] += 1
        scores[rate] = score(rate)
        rates = sorted(scores)


def pretrain_and_probe(config: ml_collections.ConfigDict, workdir: str,
                       probe_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Pretrains config in workdir (resuming) and probes it; a record of the run."""
    loop.pretrain(config, workdir)
    curves = training_curves(workdir)
    return {"workdir": relative_to_repo(workdir), "seed": config.seed,
            "learning_rate": config.learning_rate,
            "num_epochs": config.num_epochs,
            "probe": {"eval_split": probe_config.eval_split, **probe_scores(workdir, probe_config)},
            "curves": curves,
            "config": config.to_dict(), "probe_config": probe_config.to_dict(),
            "git_commit": git_commit()}


def write_json(path: str, record: dict[str, Any]) -> None:
    """Writes a record atomically (`reporting.write_json`), one space of indent."""
    reporting.write_json(path, record, indent=1)


def write_table1_report(results_dir: str, readme: str = "") -> str:
    """Table 1's report from the records in results_dir: table1.json and table1.md there and,
    if `readme` is given, its table1 block; returns the markdown."""
    summary = table1_report.summarize(results_dir)
    table = table1_report.markdown(summary)
    write_json(os.path.join(results_dir, "table1.json"), summary)
    with open(os.path.join(results_dir, "table1.md"), "w") as f:
        f.write(table)
    if readme:
        readme_blocks.write(readme, "table1", table)
    return table
