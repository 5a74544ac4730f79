"""Table 1 of the paper at CPU scale: SimSiam vs VI-SimSiam on ImageNette and ImageWoof, with
hyper-parameters chosen on each dataset's local split of train and six seeds.

    python -m experiments.reproduce_table1 --workdir=runs/table1 --results=results/table1 \
        --readme=results/README.md

The protocol, fixed in code before the runs it governs (the defaults below; flags change it
only for tests and other budgets):
1. Selection, per dataset and method, on that dataset's local split with seed 0: the config
   (experiments/configs/table1.py) is pretrained for --selection_epochs (6) at every rate of the
   method's grid (SimSiam 0.2, 0.4, 0.8; VI-SimSiam 0.0005, 0.001, 0.002), the grid extended a
   factor 2 at a time while its edge scores best, at most 3 times a side
   (`protocol.choose_learning_rate`). The score is the linear probe's top-1 on the local split
   (head fit on 80% of train, scored on the other 20%; no val image is encoded); a run that
   diverges scores -inf. Every candidate's collapse monitor (z_std) is recorded beside it.
   Then the epochs: --table_epochs (12); of several values, the best at the chosen rate.
2. Table: seeds 0-5 x dataset x method pretrain at their dataset's choice and are probed on
   val, once (the probe seeded like the pretraining); the random-init encoder of each seed too.
3. Report (experiments.table1_report): the primary measure is linear-probe top-1 and its
   paired difference VI-SimSiam - SimSiam per dataset with a 95% t interval; top-5 and kNN top-1
   are secondary; the gains over random init are set against the learning targets.

Pretraining runs in <workdir>/<dataset>_<method>/lr<lr>_ep<epochs>_seed<seed>. Each finished
candidate and run is written at once to --results as a small JSON (scores, training curves,
config, seed, git commit; workdirs relative to the repository), so a rerun skips it, even
without the workdirs; unfinished pretraining resumes from its checkpoints. --report_only
rewrites the report from --results.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import protocol, reporting, table1_report  # noqa: E402
from vi_simsiam_jax import run_config  # noqa: E402

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_CONFIGS, "table1.py"),
    "Pretraining config; its dataset, method, learning rate, epochs and seed are set per run.",
    lock_config=False)
_PROBE_CONFIG = config_flags.DEFINE_config_file(
    "probe_config", os.path.join(_CONFIGS, "probe.py"), "Linear probe config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/table1", "Pretraining workdirs.")
_RESULTS = flags.DEFINE_string("results", "results/table1", "Run records and the report.")
_README = flags.DEFINE_string("readme", "", "If set, the file whose table block is rewritten.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite the report from --results.")
_DATASETS = flags.DEFINE_list("datasets", ["imagenette", "imagewoof"], "Datasets.")
_METHODS = flags.DEFINE_list("methods", ["simsiam", "vi_simsiam"], "Methods.")
_SEEDS = flags.DEFINE_list("seeds", [str(seed) for seed in range(6)],
                           "Pretraining (and probe) seeds; the first one selects.")
_LEARNING_RATES = {
    "simsiam": flags.DEFINE_list("simsiam_learning_rates", ["0.2", "0.4", "0.8"],
                                 "SimSiam's starting learning-rate grid."),
    "vi_simsiam": flags.DEFINE_list("vi_simsiam_learning_rates", ["0.0005", "0.001", "0.002"],
                                    "VI-SimSiam's starting learning-rate grid."),
}
_EXTENSIONS = flags.DEFINE_integer("max_extensions", 3,
                                   "Grid extensions (a factor 2 each) allowed on each side.")
_SELECTION_EPOCHS = flags.DEFINE_integer("selection_epochs", 6,
                                         "Epochs at which the learning rates are compared.")
_TABLE_EPOCHS = flags.DEFINE_list("table_epochs", ["12"],
                                  "Epochs of the table runs; of several, the best is chosen.")


def table_config(dataset: str, method: str, learning_rate: float, num_epochs: int, seed: int
               ) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    config.update(dataset=dataset, method=method, learning_rate=learning_rate,
                  num_epochs=num_epochs, seed=seed)
    return config


def run_workdir(config: ml_collections.ConfigDict) -> str:
    return os.path.join(_WORKDIR.value,
                        f"{table1_report.dataset_name(config.dataset)}_{config.method}",
                        f"lr{config.learning_rate:g}_ep{config.num_epochs}_seed{config.seed}")


def probe_config(seed: int, local: bool = False) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(_PROBE_CONFIG.value.to_dict())
    config.seed = seed
    return protocol.local_probe_config(config) if local else config


def select(dataset: str, method: str, seed: int) -> dict[str, float | int]:
    """The method's learning rate, then its epochs, on the dataset's local split (module doc)."""
    path = table1_report.selection_path(_RESULTS.value, dataset, method)
    record = {"dataset": table1_report.dataset_name(dataset), "method": method, "seed": seed,
              "protocol": {"grid": [float(lr) for lr in _LEARNING_RATES[method].value],
                           "factor": 2.0, "max_extensions": _EXTENSIONS.value,
                           "selection_epochs": _SELECTION_EPOCHS.value,
                           "table_epochs": [int(e) for e in _TABLE_EPOCHS.value]},
              "candidates": []}
    if os.path.exists(path):  # a started selection keeps its seed, whatever --seeds says now
        with open(path) as f:
            record.update(json.load(f))  # and a finished one is rewritten byte for byte
        seed = record["seed"]

    def top1(learning_rate: float, num_epochs: int) -> float:
        for candidate in record["candidates"]:
            if (candidate["learning_rate"], candidate["num_epochs"]) == (learning_rate,
                                                                         num_epochs):
                return candidate["probe"]["top1"] if candidate["probe"] else -math.inf
        config = table_config(dataset, method, learning_rate, num_epochs, seed)
        workdir = run_workdir(config)
        logging.info("Selection: %s on %s, lr %g, %d epochs", method, dataset, learning_rate,
                     num_epochs)
        try:
            candidate = protocol.pretrain_and_probe(config, workdir,
                                                    probe_config(seed, local=True))
        except FloatingPointError as error:  # diverged: recorded, scored -inf
            candidate = {"workdir": reporting.relative_to_repo(workdir), "seed": seed,
                         "learning_rate": learning_rate, "num_epochs": num_epochs,
                         "probe": None, "diverged": str(error),
                         "curves": protocol.training_curves(workdir),
                         "config": config.to_dict(), "git_commit": reporting.git_commit()}
        candidate["z_std"] = table1_report.collapse_monitor(candidate["curves"])
        record["candidates"].append(candidate)
        protocol.write_json(path, record)
        return candidate["probe"]["top1"] if candidate["probe"] else -math.inf

    learning_rate = protocol.choose_learning_rate(
        [float(lr) for lr in _LEARNING_RATES[method].value],
        lambda lr: top1(lr, _SELECTION_EPOCHS.value), max_extensions=_EXTENSIONS.value)
    epochs = [int(e) for e in _TABLE_EPOCHS.value]
    num_epochs = epochs[0] if len(epochs) == 1 else max(
        epochs, key=lambda e: top1(learning_rate, e))
    record["chosen"] = {"learning_rate": learning_rate, "num_epochs": num_epochs}
    record["selected_by"] = ("linear-probe top-1 on the local split of train (head fit on 80%, "
                             "scored on 20%); learning rate at the selection epochs, then epochs")
    if "random_init" not in record:  # the candidates' common initial encoder, scored alike
        record["random_init"] = protocol.probe_scores(
            reporting.resolve(record["candidates"][0]["workdir"]),
            probe_config(seed, local=True), random_init=True)
    protocol.write_json(path, record)
    return record["chosen"]


def table_run(dataset: str, method: str, chosen: dict, seed: int) -> None:
    """Pretrains (or reuses) one cell's run and probes it on val."""
    config = table_config(dataset, method, chosen["learning_rate"], chosen["num_epochs"], seed)
    workdir = run_workdir(config)
    path = table1_report.record_path(_RESULTS.value, dataset, method, seed)
    if not os.path.exists(path):
        logging.info("Table: %s on %s, seed %d", method, dataset, seed)
        record = protocol.pretrain_and_probe(config, workdir, probe_config(seed))
        protocol.write_json(path, {"dataset": table1_report.dataset_name(dataset),
                                   "method": method, "chosen_by": os.path.basename(
                                       table1_report.selection_path(_RESULTS.value, dataset,
                                                                    method)),
                                   **record})


def random_init_run(dataset: str, chosen: dict, seed: int) -> None:
    """The probe on val of the untrained encoder of `seed`: the first method's initial weights,
    in a workdir of its own (it needs only the config, not that method's pretraining)."""
    path = table1_report.record_path(_RESULTS.value, dataset, "random_init", seed)
    if not os.path.exists(path):
        name, method = table1_report.dataset_name(dataset), _METHODS.value[0]
        workdir = os.path.join(_WORKDIR.value, f"{name}_random_init", f"seed{seed}")
        os.makedirs(workdir, exist_ok=True)
        config = table_config(dataset, method, chosen[method]["learning_rate"],
                            chosen[method]["num_epochs"], seed)
        run_config.save_config(workdir, config)
        probe = probe_config(seed)
        protocol.write_json(path, {
            "dataset": name, "method": "random_init", "seed": seed,
            "encoder": {"method": method, "model": config.model.to_dict(),
                        "initialisation": f"train_state.init_variables, jax.random.key({seed})"},
            "probe": {"eval_split": probe.eval_split,
                      **protocol.probe_scores(workdir, probe, random_init=True)},
            "probe_config": probe.to_dict(), "git_commit": reporting.git_commit()})


def plot_curves(results_dir: str, path: str) -> None:
    """Loss, cos(p, z) and mean kappa over training: one row per dataset, one line per run."""
    panels = ["loss: SimSiam", "loss: VI-SimSiam", "cosine", "kappa_mean"]
    records = [r for r in table1_report.load_runs(results_dir) if r["method"] != "random_init"]
    datasets = sorted({r["dataset"] for r in records})
    if not datasets:
        return
    fig, axes = plt.subplots(len(datasets), len(panels), squeeze=False,
                             figsize=(4 * len(panels), 3.2 * len(datasets)))
    for row, dataset in zip(axes, datasets):
        for record in (r for r in records if r["dataset"] == dataset):
            name = table1_report.METHOD_NAMES[record["method"]]
            steps = [c["step"] for c in record["curves"]]
            label = f"{name}, seed {record['seed']}"
            row[panels.index(f"loss: {name}")].plot(steps, [c["loss"] for c in record["curves"]])
            for ax, key in zip(row[2:], panels[2:]):
                if key in record["curves"][0]:
                    ax.plot(steps, [c[key] for c in record["curves"]], label=label)
        for ax, title in zip(row, panels):
            ax.set_title(f"{dataset}: {title}", fontsize=9)
            ax.set_xlabel("step")
        row[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report() -> str:
    return protocol.write_table1_report(_RESULTS.value, _README.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = set(_METHODS.value) - set(_LEARNING_RATES)
    if unknown:
        raise app.UsageError(f"--methods must be among {sorted(_LEARNING_RATES)}, got {unknown}.")
    if not _REPORT_ONLY.value:
        seeds = [int(seed) for seed in _SEEDS.value]
        for dataset in _DATASETS.value:
            chosen = {method: select(dataset, method, seeds[0]) for method in _METHODS.value}
            for seed in seeds:
                for method in _METHODS.value:
                    table_run(dataset, method, chosen[method], seed)
                random_init_run(dataset, chosen, seed)
                print(report(), flush=True)
        os.makedirs(_WORKDIR.value, exist_ok=True)
        plot_curves(_RESULTS.value, os.path.join(_WORKDIR.value, "curves.png"))
    print(report())


if __name__ == "__main__":
    app.run(main)
