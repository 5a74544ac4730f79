"""The selection protocol shared by experiments.tune_lr and experiments.reproduce_table1.

Hyper-parameters are chosen by the linear probe on the local split of train (paper Sec. 6.1: the
head is fit on 80% of train and scored on the other 20%; no val image is encoded); val is read
once, for the reported numbers. A record of every run holds what a reader needs to check it:
scores, per-step training curves, the config and the git commit.
"""

import json
import os
import subprocess
from typing import Any

import ml_collections

from experiments import reporting
from vi_simsiam_jax import loop

SCORES = ("top1", "top5", "knn_top1", "learning_rate", "lr_sweep_local_val_top1")
# The training-curve fields kept from metrics.jsonl (kappa only for the VI methods).
CURVE_FIELDS = ("step", "epoch", "loss", "cosine", "kappa_mean", "kappa_std", "z_std",
                "learning_rate", "images_per_sec")


def git_commit() -> str:
    """HEAD's commit, "-dirty" appended when tracked files differ from it."""
    result = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"],
                            capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    return result.stdout.strip() or "unknown"


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
    """The logged training metrics of a workdir (every log_every_steps), CURVE_FIELDS only."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: row[k] for k in CURVE_FIELDS if k in row} for row in rows]


def pretrain_and_probe(config: ml_collections.ConfigDict, workdir: str,
                       probe_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Pretrains config in workdir (resuming) and probes it; a record of the run."""
    loop.pretrain(config, workdir)
    curves = training_curves(workdir)
    return {"workdir": workdir, "seed": config.seed, "learning_rate": config.learning_rate,
            "num_epochs": config.num_epochs,
            "probe": {"eval_split": probe_config.eval_split, **probe_scores(workdir, probe_config)},
            "curves": curves,
            "config": config.to_dict(), "probe_config": probe_config.to_dict(),
            "git_commit": git_commit()}


def write_json(path: str, record: dict[str, Any]) -> None:
    """Writes record to path atomically (a crash leaves the previous file, never half a one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
