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
- ood.json: every number (AUROC and FPR at 95% TPR per score, per-severity statistics), the
  workdir, the run record under results/ that names it (if any) and the code's git commit.
The linear probe (--config, as experiments.linear_probe) is fit first; its head, scored images
and training features are handed to the analysis in memory. The tables of results/README.md are
made from saved ood.json files by experiments.results_readme.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import reporting
from vi_simsiam_jax import run_config
from vi_simsiam_jax.evaluation import corruptions, ood_report

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "probe.py"),
    "Linear probe config (experiments/configs/probe.py).", lock_config=True)
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
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Output folder (default: workdir/ood_analysis).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        severities = [int(s) for s in _SEVERITIES.value]
    except ValueError as e:
        raise app.UsageError(f"--severities must be integers 1 to 5: {e}") from e
    workdir, config = _WORKDIR.value, _CONFIG.value
    ood_report.check_corruptions(_CORRUPTIONS.value, severities)
    ood = None
    if _OOD_DATASET.value:  # before any feature is computed, so a missing dataset fails fast
        ood = ood_report.load_ood_examples(_OOD_DATASET.value, run_config.load_config(workdir),
                                           _OOD_ARCHIVE.value)
    frozen, train, result = reporting.fit_probe(workdir, config, _STEP.value)
    analysis = ood_report.analyze(frozen, result, train, ood=ood, corruptions=_CORRUPTIONS.value,
                                  severities=severities)
    summary = reporting.write_ood_analysis(
        analysis, workdir, _OUTPUT_DIR.value or os.path.join(workdir, "ood_analysis"))
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
