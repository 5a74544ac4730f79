"""Is kappa an uncertainty beyond the training data? Out-of-distribution detection and
corruptions, for a pretrained encoder (VI-SimSiam; for SimSiam only the baselines exist).

    python -m experiments.analyze_ood --workdir=runs/demo --ood_dataset=imagewoof

Scores (high = in-distribution): kappa, the linear probe's max softmax, the cosine similarity to
the nearest training image, the feature norm; see vi_simsiam_jax/evaluation/ood_report.py.
Writes to --output_dir (default workdir/ood_analysis):
- ood_histograms.png, ood_roc.png: every score on the pretraining dataset's val images against
  --ood_dataset's (ImageNette, ImageWoof or a folder <path>/{train,val}/<class>/<image>);
- corruptions.png: probe top-1, median kappa and the AUROC of kappa for clean vs corrupted val
  images against severity, for each of --corruptions (ImageNet-C parameters, see
  vi_simsiam_jax/evaluation/corruptions.py);
- ood.json: every number (AUROC and FPR at 95% TPR per score, per-severity statistics).
The probe's head comes from its predictions file (experiments.linear_probe, run first if
missing). `--tables=results/ood` prints the README's tables from saved ood.json files.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import glob
import json
import os

from absl import app, flags
from ml_collections import config_flags

from vi_simsiam_jax.evaluation import corruptions, ood_report

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "probe.py"),
    "Probe config, used only if the probe has to be run first.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A pretraining workdir.")
_OOD_DATASET = flags.DEFINE_string(
    "ood_dataset", None, "Out-of-distribution dataset: imagenette, imagewoof or a folder "
    "(none: corruptions only).")
_OOD_ARCHIVE = flags.DEFINE_string(
    "ood_archive", None, "Its fast.ai .tgz (default: looked up in $VI_SIMSIAM_DATASETS or "
    "../shared/datasets).")
_CORRUPTIONS = flags.DEFINE_list("corruptions", list(corruptions.CORRUPTIONS),
                                 "Corruptions to apply (empty: none).")
_SEVERITIES = flags.DEFINE_list("severities", [str(s) for s in corruptions.SEVERITIES],
                                "Corruption severities, 1 to 5.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_PREDICTIONS = flags.DEFINE_string(
    "predictions", None, "Probe predictions .npz (default: beside the default probe JSON).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Output folder (default: workdir/ood_analysis).")
_TABLES = flags.DEFINE_string(
    "tables", None, "Instead of analysing: print the README's markdown tables from the ood.json "
    "files in this folder (e.g. results/ood).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _TABLES.value:
        paths = sorted(glob.glob(os.path.join(_TABLES.value, "*.json")))
        if not paths:
            raise app.UsageError(f"--tables: no .json files in {_TABLES.value}.")
        summaries = []
        for path in paths:
            with open(path) as f:
                summaries.append(json.load(f))
        print(ood_report.markdown_tables(summaries))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (or --tables).")
    try:
        severities = [int(s) for s in _SEVERITIES.value]
    except ValueError as e:
        raise app.UsageError(f"--severities must be integers 1 to 5: {e}") from e
    summary = ood_report.analyze(
        _WORKDIR.value, ood_dataset=_OOD_DATASET.value, ood_archive=_OOD_ARCHIVE.value,
        corruptions=_CORRUPTIONS.value, severities=severities, step=_STEP.value,
        predictions=_PREDICTIONS.value, output_dir=_OUTPUT_DIR.value,
        batch_size=_CONFIG.value.extract_batch_size, probe_config=_CONFIG.value)
    shown = {k: summary[k] for k in ("step", "method", "clean", "files")}
    if "ood" in summary:
        shown["ood"] = summary["ood"]
    if "corruptions" in summary:
        shown["corruptions"] = {
            name: [{k: p[k] for k in ("severity", "top1", "kappa_median") if k in p}
                   for p in points] for name, points in summary["corruptions"].items()}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    app.run(main)
