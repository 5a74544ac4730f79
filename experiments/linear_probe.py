"""Linear evaluation of a pretrained encoder (paper Sec. 6.1-6.2, Table 1).

    python -m experiments.linear_probe --workdir=/tmp/run
    python -m experiments.linear_probe --workdir=/tmp/run --random_init      # untrained anchor
    python -m experiments.linear_probe --workdir=/tmp/run --lr_sweep=1.6,3.2  # or --lr_sweep=
    python -m experiments.linear_probe --workdir=/tmp/run --config.mode=online \
        --lr_sweep= --config.learning_rate=6.4                              # SimSiam's recipe

Prints top-1/top-5 on val and writes the result JSON (default workdir/probe.json, or
probe_random_init.json) with the per-example predictions beside it (probe_predictions.npz).
The probe settings are in experiments/configs/probe.py; the dataset, image size and model come
from the workdir's config.json.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import reporting

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "probe.py"),
    "Probe config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (config.json, checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to probe (default: the newest).")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False,
                                 "Probe the untrained encoder (the run's initial weights).")
_OUTPUT = flags.DEFINE_string("output", None, "Result JSON (default: in --workdir).")
_LR_SWEEP = flags.DEFINE_list(
    "lr_sweep", None, "Learning rates compared on the local split (80/20 of train), the best "
    "used for the final fit; replaces config.lr_sweep. Empty: config.learning_rate, no sweep.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _RANDOM_INIT.value and _STEP.value is not None:
        raise app.UsageError("--random_init probes the untrained encoder; drop --step.")
    config = _CONFIG.value
    if _LR_SWEEP.value is not None:
        try:
            config.lr_sweep = tuple(float(lr) for lr in _LR_SWEEP.value)
        except ValueError as error:
            raise app.UsageError(f"--lr_sweep must be comma-separated numbers: {error}") from None
    _, _, result = reporting.probe(_WORKDIR.value, config, step=_STEP.value,
                                   random_init=_RANDOM_INIT.value, output=_OUTPUT.value)
    summary = {k: result[k] for k in ("step", "random_init", "top1", "top5", "knn_top1",
                                      "learning_rate", "lr_sweep_local_val_top1", "wall_time_s",
                                      "output", "predictions") if k in result}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
