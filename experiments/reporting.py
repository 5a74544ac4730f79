"""What the experiment modules write from the evaluators' in-memory results: the probe's JSON
and per-image predictions, and the kappa and OOD analyses' JSON and figures (experiments/
figures.py). The evaluators themselves (vi_simsiam_jax/evaluation) write nothing.

Files in a pretraining workdir: probe[_local_val][_random_init][_step<N>].json with
<same name>_predictions.npz beside it (per scored image: logits, label, file name and, for
VI-SimSiam, kappa), kappa_analysis/ and ood_analysis/.
"""

import json
import os
import pathlib
import subprocess
from typing import Any

import ml_collections
import numpy as np

from experiments import figures
from vi_simsiam_jax import datasets, files
from vi_simsiam_jax.evaluation import encoder, kappa_report, linear_probe, ood_report

PREDICTIONS_SUFFIX = "_predictions.npz"
REPO = pathlib.Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD's commit, "-dirty" appended when tracked files differ from it."""
    result = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"],
                            capture_output=True, text=True, cwd=REPO)
    return result.stdout.strip() or "unknown"


def relative_to_repo(path: str) -> str:
    """path relative to the repository when it lies inside it (records name no machine's
    absolute paths), else as given."""
    absolute = pathlib.Path(path).resolve()
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else path


def resolve(path: str) -> str:
    """A recorded path: relative ones lie in the repository."""
    return path if os.path.isabs(path) else str(REPO / path)


def write_json(path: str, data: Any, indent: int = 2) -> None:
    """Writes data as indented JSON, atomically (a crash leaves the previous file, never half a
    one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_write(path) as f:
        json.dump(data, f, indent=indent)


def probe_output(workdir: str, step: int | None = None, random_init: bool = False,
                 eval_split: str = "val") -> str:
    """workdir/probe[_local_val][_random_init][_step<N>].json."""
    name = "probe" + ("_local_val" if eval_split == "local_val" else "")
    name += "_random_init" if random_init else ""
    name += f"_step{step}" if step is not None else ""
    return os.path.join(workdir, name + ".json")


def write_probe(result: linear_probe.ProbeResult, workdir: str, output: str) -> dict[str, Any]:
    """Writes the probe's JSON to `output` and its per-image predictions beside it; returns the
    JSON written."""
    predictions = os.path.splitext(output)[0] + PREDICTIONS_SUFFIX
    written = {"workdir": relative_to_repo(workdir), **result.metrics, "output": output,
               "predictions": predictions}
    scored = result.scored
    arrays = {"logits": result.logits, "labels": scored.labels,
              "file_names": np.array([str(n) for n in
                                      result.scored_examples.file_names[scored.index]]),
              "label_names": np.array(result.scored_examples.label_names)}
    if scored.kappa is not None:
        arrays["kappa"] = scored.kappa
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with files.atomic_write(predictions, "wb") as f:
        np.savez(f, **arrays)
    write_json(output, written)
    return written


def fit_probe(workdir: str, config: ml_collections.ConfigDict, step: int | None = None,
              random_init: bool = False
              ) -> tuple[encoder.FrozenEncoder, datasets.Examples, linear_probe.ProbeResult]:
    """Restores the workdir's encoder (or its initial weights) and runs the linear probe on its
    dataset; returns (encoder, train examples, probe result). Writes nothing."""
    linear_probe.validate_config(config)
    frozen = encoder.load(workdir, step, random_init, config.half_precision)
    train, val = encoder.load_splits(frozen.config)
    return frozen, train, linear_probe.evaluate(frozen, train, val, config)


def probe(workdir: str, config: ml_collections.ConfigDict, *, step: int | None = None,
          random_init: bool = False, output: str | None = None
          ) -> tuple[encoder.FrozenEncoder, linear_probe.ProbeResult, dict[str, Any]]:
    """`fit_probe` and its files (output: default `probe_output`); returns (encoder, result,
    the JSON written)."""
    frozen, _, result = fit_probe(workdir, config, step, random_init)
    output = output or probe_output(workdir, step, random_init, config.eval_split)
    return frozen, result, write_probe(result, workdir, output)


def write_kappa_analysis(frozen: encoder.FrozenEncoder, result: linear_probe.ProbeResult,
                         output_dir: str, num_images: int = 16) -> dict[str, Any]:
    """kappa_report.analyze of the probe result, its four figures and uncertainty.json in
    output_dir; returns the summary with the paths written."""
    builder = datasets.prepare_from_config(frozen.config)
    descriptions = (builder.builder_config.label_descriptions
                    or result.scored_examples.label_names)
    summary = kappa_report.analyze(result, descriptions, num_images)
    os.makedirs(output_dir, exist_ok=True)
    files = figures.kappa_figures(result, summary, frozen.config.model, output_dir)
    summary["files"] = {**files, "summary": os.path.join(output_dir, "uncertainty.json")}
    write_json(summary["files"]["summary"], summary)
    return summary


def run_record(workdir: str) -> str | None:
    """The committed run record under results/ of the pretraining in workdir (its "workdir"
    field, repository-relative, names it), if there is one."""
    workdir = relative_to_repo(workdir)
    for path in sorted(REPO.glob("results/**/*.json")):
        with open(path) as f:
            record = json.load(f)
        if isinstance(record, dict) and record.get("workdir") == workdir:
            return str(path.relative_to(REPO))
    return None


def write_ood_analysis(analysis: ood_report.OodAnalysis, workdir: str, output_dir: str
                       ) -> dict[str, Any]:
    """The OOD analysis's figures and ood.json in output_dir, with what it analysed (workdir,
    its run record) and the code commit; returns the summary with the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    summary = {**analysis.summary, "workdir": relative_to_repo(workdir),
               "encoder_record": run_record(workdir), "git_commit": git_commit()}
    summary["files"] = {**figures.ood_figures(analysis, output_dir),
                        "summary": os.path.join(output_dir, "ood.json")}
    write_json(summary["files"]["summary"], summary)
    return summary
