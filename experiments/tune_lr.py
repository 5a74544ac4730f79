"""Chooses the pretraining learning rate on the local split of train (paper Sec. 6.1), never on val.

    python -m experiments.tune_lr --config=experiments/configs/cpu_demo.py \
        --learning_rates=0.002,0.005,0.01 --workdir=runs/tune_demo --output=results/demo_lr.json

For every learning rate the config is pretrained in <workdir>/lr_<lr> (resuming), then linearly
probed with eval_split="local_val": the head is fit on 80% of train and scored on the other 20%,
and no val image is encoded or scored. The random-init encoder is scored alike. The learning
rate with the best local_val probe top-1 is chosen. Writes --output (JSON: every score, the
choice, the configs and the git commit).
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import os

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import protocol, reporting

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config.",
                                          lock_config=False)
_PROBE_CONFIG = config_flags.DEFINE_config_file(
    "probe_config", os.path.join(os.path.dirname(__file__), "configs", "probe.py"),
    "Linear probe config (its eval_split is set to local_val).", lock_config=False)
_LEARNING_RATES = flags.DEFINE_list("learning_rates", None, "Candidate learning rates.")
_WORKDIR = flags.DEFINE_string("workdir", None, "One pretraining workdir per learning rate.")
_OUTPUT = flags.DEFINE_string("output", None, "Result JSON (default <workdir>/tune_lr.json).")
flags.mark_flags_as_required(["config", "learning_rates", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    probe_config = protocol.local_probe_config(_PROBE_CONFIG.value)
    scores, workdirs = {}, []
    for text in _LEARNING_RATES.value:
        config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
        config.learning_rate = float(text)
        workdirs.append(os.path.join(_WORKDIR.value, f"lr_{text}"))
        scores[text] = protocol.pretrain_and_probe(config, workdirs[-1], probe_config)["probe"]
        logging.info("pretraining lr %s: local_val probe top-1 %.2f", text, scores[text]["top1"])
    # Every run starts from the same seed, so any workdir holds the common random init.
    random_init = protocol.probe_scores(workdirs[0], probe_config, random_init=True)
    chosen = max(scores, key=lambda text: scores[text]["top1"])
    report = {
        "selection": "linear probe top-1 on local_val (20% of train); no val image encoded",
        "chosen_learning_rate": float(chosen), "local_val": scores,
        "random_init_local_val": random_init,
        "learning_rates_run": [float(text) for text in _LEARNING_RATES.value],
        # The config of every run, its learning rate set per run (learning_rates_run).
        "config": {**_CONFIG.value.to_dict(), "learning_rate": None},
        "probe_config": probe_config.to_dict(),
        "git_commit": reporting.git_commit(),
    }
    output = _OUTPUT.value or os.path.join(_WORKDIR.value, "tune_lr.json")
    protocol.write_json(output, report)
    print(f"chosen learning rate {chosen} (local_val top-1 {scores[chosen]['top1']:.2f}, "
          f"random init {random_init['top1']:.2f}) -> {output}")


if __name__ == "__main__":
    app.run(main)
