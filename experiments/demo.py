"""The whole method end to end at CPU scale: `make demo`.

    python -m experiments.demo --workdir=runs/demo

Prepares ImageNette (from $VI_SIMSIAM_DATASETS or ../shared/datasets, else downloads it),
pretrains VI-SimSiam with experiments/configs/cpu_demo.py, fits the linear probe on it and on
the same encoder at its random initialisation, runs the kappa analysis, and writes
<workdir>/report.json. Rerunning resumes the pretraining and redoes the rest.

    python -m experiments.demo --workdir=runs/demo --publish

also copies the report and its sources to results/demo/ and rewrites the README's demo block
from them (experiments/demo_report.py).
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json
import os
import shutil
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import demo_report, readme_blocks, reporting
from vi_simsiam_jax import datasets, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "cpu_demo.py"),
    "Pretraining config.", lock_config=True)
_PROBE_CONFIG = config_flags.DEFINE_config_file(
    "probe_config", os.path.join(os.path.dirname(__file__), "configs", "probe.py"),
    "Linear probe config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
_PUBLISH = flags.DEFINE_bool("publish", False, "Also copy the report to results/demo/ and "
                             "regenerate the README's demo block from it.")


def _accuracy(result: dict) -> dict[str, float]:
    return {"top1": result["top1"], "top5": result["top5"], "knn_top1": result.get("knn_top1")}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config, workdir = _CONFIG.value, _WORKDIR.value
    timings = {}

    start = time.perf_counter()
    builder = datasets.prepare_from_config(config)
    timings["prepare_s"] = time.perf_counter() - start
    logging.info("Dataset: %s", json.dumps(datasets.summary(builder)))

    start = time.perf_counter()
    loop.pretrain(config, workdir)
    timings["pretrain_s"] = time.perf_counter() - start

    start = time.perf_counter()
    frozen, probe, trained = reporting.probe(workdir, _PROBE_CONFIG.value)
    _, _, baseline = reporting.probe(workdir, _PROBE_CONFIG.value, random_init=True)
    timings["probe_s"] = time.perf_counter() - start

    start = time.perf_counter()
    kappa = reporting.write_kappa_analysis(frozen, probe,
                                           os.path.join(workdir, "kappa_analysis"))
    timings["analysis_s"] = time.perf_counter() - start

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    last_log = [row for row in logged if "loss" in row][-1]
    knn_curve = {row["step"]: row["knn_top1_local_val"] for row in logged
                 if "knn_top1_local_val" in row}
    report = {
        "probe": _accuracy(trained), "baseline": _accuracy(baseline),
        "kappa": {k: kappa[k] for k in ("kappa", "auroc_kappa", "auroc_max_softmax",
                                        "accuracy_at_coverage")},
        "pretrain": {k: last_log.get(k) for k in ("step", "loss", "kappa_mean", "cosine",
                                                  "z_std")},
        "knn_monitor": knn_curve,  # step -> kNN top-1 on the local split while pretraining
        "figures": kappa["files"], "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "config": {k: config[k] for k in ("method", "num_epochs", "learning_rate", "seed")},
    }
    path = os.path.join(workdir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nVI-SimSiam demo ({config.dataset}, {last_log['step']} steps) -> {path}")
    print(f"  linear probe top-1/top-5: {trained['top1']:.2f} / {trained['top5']:.2f}")
    print(f"  random-init  top-1/top-5: {baseline['top1']:.2f} / {baseline['top5']:.2f}")
    print(f"  kappa median {kappa['kappa']['p50']:.1f}; AUROC of kappa for a correct probe "
          f"prediction: {kappa['auroc_kappa']}")
    print(f"  figures: {os.path.dirname(kappa['files']['summary'])}")
    if _PUBLISH.value:
        results = reporting.REPO / "results" / "demo"
        for name in demo_report.PUBLISHED_FILES:
            shutil.copy(os.path.join(workdir, name), results / os.path.basename(name))
        readme_blocks.write(str(reporting.REPO / "README.md"), demo_report.README_BLOCK,
                            demo_report.markdown(report))
        print(f"  published to {results} and README.md")


if __name__ == "__main__":
    app.run(main)
