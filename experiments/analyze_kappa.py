"""What does VI-SimSiam's predicted concentration kappa capture? (paper Sec. 6.3, Fig. 3-4)

    python -m experiments.analyze_kappa --workdir=/tmp/run [--step=N]

Over the validation split, writes to --output_dir (default workdir/kappa_analysis):
- kappa_histogram.png: the distribution of predicted kappa (Fig. 4, left);
- kappa_extremes.png: the lowest- and highest-kappa images, un-normalised (Fig. 4, right),
  titled with kappa, the class and whether the linear probe is right (green) or wrong (red);
- loss_surface.png: -log PS(z; mu, kappa) over cos(mu, z) and kappa at the model's dim (Fig. 3);
- risk_coverage.png: probe accuracy as the least certain images are set aside, ordered by kappa,
  by the probe's max softmax probability, and by an oracle;
- uncertainty.json: kappa statistics, AUROC of kappa for "the probe is right", accuracy at
  coverages 100/90/75/50%, the extreme images, the paths above.

kappa and the probe's predictions come from one forward pass of the val images: the linear
probe (--config, as experiments.linear_probe) is fit first and its result handed over in memory.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import reporting
from vi_simsiam_jax import run_config
from vi_simsiam_jax.evaluation import kappa_report

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "probe.py"),
    "Linear probe config (experiments/configs/probe.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "A pretraining workdir of a method with kappa (VI-SimSiam).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Output folder (default: workdir/kappa_analysis).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 16, "Images in each extreme-kappa grid.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir = _WORKDIR.value
    kappa_report.check_kappa(run_config.load_config(workdir), workdir)
    frozen, _, result = reporting.fit_probe(workdir, _CONFIG.value, _STEP.value)
    summary = reporting.write_kappa_analysis(
        frozen, result, _OUTPUT_DIR.value or os.path.join(workdir, "kappa_analysis"),
        _NUM_IMAGES.value)
    print(json.dumps({k: summary[k] for k in ("step", "num_val", "kappa", "probe_top1",
                                              "auroc_kappa", "auroc_max_softmax",
                                              "accuracy_at_coverage", "files")}, indent=2))


if __name__ == "__main__":
    app.run(main)
