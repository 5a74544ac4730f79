"""Table 1 of the paper at CPU scale: SimSiam vs VI-SimSiam on ImageNette and ImageWoof.

    python -m experiments.reproduce_table1 --workdir=runs/table1

Every (dataset, method) pretrains with experiments/configs/table1.py (one budget for all: epochs,
crop sizes, batch, seed) in <workdir>/<dataset>_<method>, then gets the linear probe
(top-1/top-5, experiments/configs/probe.py) and the kNN monitor at every kept checkpoint. Each
dataset also gets the random-init probe (the runs' common initial encoder). Writes
<workdir>/table1.json, table1.md (beside the paper's numbers) and curves.png (loss, cosine, kappa,
kNN over training). Rerunning resumes: finished pretraining, probes and kNN points are reused.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vi_simsiam_jax import checkpoints, loop  # noqa: E402
from vi_simsiam_jax.evaluation import linear_probe  # noqa: E402

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_CONFIGS, "table1.py"),
    "Pretraining config; its dataset and method are replaced per run.", lock_config=False)
_PROBE_CONFIG = config_flags.DEFINE_config_file(
    "probe_config", os.path.join(_CONFIGS, "probe.py"), "Linear probe config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/table1", "Output directory.")
_DATASETS = flags.DEFINE_list("datasets", ["imagenette", "imagewoof"], "Datasets.")
_METHODS = flags.DEFINE_list("methods", ["simsiam", "vi_simsiam"], "Methods.")

# The paper's Table 1: linear-probe (top-1, top-5) in %, ResNet-18, 200 epochs.
PAPER = {"imagenette": {"simsiam": (88.223, 98.236), "vi_simsiam": (90.650, 99.389)},
         "imagewoof": {"simsiam": (72.410, 97.480), "vi_simsiam": (78.468, 98.066)}}
METHOD_NAMES = {"simsiam": "SimSiam", "vi_simsiam": "VI-SimSiam"}


def _cached_json(path: str, compute):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def _probe(workdir: str, config: ml_collections.ConfigDict, random_init: bool = False) -> dict:
    path = linear_probe.default_output(workdir, random_init=random_init)
    if not os.path.exists(path):
        linear_probe.run(workdir, config, random_init=random_init, output=path)
    with open(path) as f:
        result = json.load(f)
    return {k: result[k] for k in ("step", "top1", "top5", "knn_top1", "learning_rate")}


def knn_curve(workdir: str, config: ml_collections.ConfigDict, final: dict) -> list[list[float]]:
    """[step, kNN top-1] at every kept checkpoint (the last from the probe's features)."""
    manager = checkpoints.manager(workdir, read_only=True)
    steps = [step for step in manager.all_steps() if step != final["step"]]
    manager.close()

    def compute(step: int) -> list[float]:
        return list(linear_probe.knn_accuracy(workdir, config, step))

    curve = [_cached_json(os.path.join(workdir, f"knn_{step}.json"), lambda s=step: compute(s))
             for step in sorted(steps)]
    return curve + [[final["step"], final["knn_top1"]]]


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def plot_curves(runs: dict, path: str) -> None:
    """One row per dataset: each method's loss, then cosine, kappa and kNN top-1 per method."""
    panels = ["loss: SimSiam", "loss: VI-SimSiam", "cosine(p, z)", "mean kappa", "kNN top-1 (%)"]
    datasets = list(runs)
    fig, axes = plt.subplots(len(datasets), len(panels), figsize=(4 * len(panels),
                                                                   3.2 * len(datasets)),
                             squeeze=False)
    for row, dataset in zip(axes, datasets):
        for method, run in runs[dataset].items():
            steps = [m["step"] for m in run["metrics"]]
            label = METHOD_NAMES[method]
            row[panels.index(f"loss: {label}")].plot(steps, [m["loss"] for m in run["metrics"]])
            row[2].plot(steps, [m["cosine"] for m in run["metrics"]], label=label)
            if method == "vi_simsiam":
                row[3].plot(steps, [m["kappa_mean"] for m in run["metrics"]], label=label)
            row[4].plot(*zip(*run["knn"]), marker="o", label=label)
        for ax, title in zip(row, panels):
            ax.set_title(f"{dataset}: {title}", fontsize=9)
            ax.set_xlabel("step")
        row[2].legend(fontsize=8)
        row[4].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(results: dict, budget: str) -> str:
    lines = [f"Linear probe top-1 / top-5 and kNN top-1 on val (%), {budget}. Paper: Table 1 "
             "(200 epochs).", "",
             "| dataset | method | top-1 | top-5 | kNN top-1 | paper top-1 / top-5 |",
             "|---|---|---|---|---|---|"]
    for dataset, rows in results.items():
        for method, r in rows.items():
            name = "random init" if method == "random_init" else METHOD_NAMES[method]
            paper = PAPER.get(dataset, {}).get(method)
            paper = "" if paper is None else f"{paper[0]:.2f} / {paper[1]:.2f}"
            lines.append(f"| {dataset} | {name} | {r['top1']:.2f} | {r['top5']:.2f} | "
                         f"{r['knn_top1']:.2f} | {paper} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = set(_METHODS.value) - set(METHOD_NAMES)
    if unknown:
        raise app.UsageError(f"--methods must be among {sorted(METHOD_NAMES)}, got {unknown}.")
    root, probe_config = _WORKDIR.value, _PROBE_CONFIG.value
    os.makedirs(root, exist_ok=True)
    results, runs = {}, {}
    for dataset in _DATASETS.value:
        results[dataset], runs[dataset] = {}, {}
        for method in _METHODS.value:
            config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
            config.dataset, config.method = dataset, method
            workdir = os.path.join(root, f"{os.path.basename(os.path.normpath(dataset))}_{method}")
            logging.info("Pretraining %s on %s in %s", method, dataset, workdir)
            loop.train_and_evaluate(config, workdir)
            results[dataset][method] = _probe(workdir, probe_config)
            runs[dataset][method] = {"metrics": read_metrics(workdir),
                                     "knn": knn_curve(workdir, probe_config,
                                                      results[dataset][method])}
            print(dataset, method, json.dumps(results[dataset][method]), flush=True)
        results[dataset]["random_init"] = _probe(workdir, probe_config, random_init=True)
    config = _CONFIG.value
    budget = (f"{config.num_epochs} epochs, batch {config.batch_size}, {config.global_crops}x"
              f"{config.global_size} px + {config.local_crops}x{config.local_size} px crops, "
              f"seed {config.seed}")
    with open(os.path.join(root, "table1.json"), "w") as f:
        json.dump({"budget": budget, "config": config.to_dict(), "results": results,
                   "knn_curves": {d: {m: r["knn"] for m, r in rs.items()}
                                  for d, rs in runs.items()}}, f, indent=2)
    table = markdown_table(results, budget)
    with open(os.path.join(root, "table1.md"), "w") as f:
        f.write(table)
    plot_curves(runs, os.path.join(root, "curves.png"))
    print(table)


if __name__ == "__main__":
    app.run(main)
