"""The confirmatory Table 1: fresh seeds under the six-seed table's frozen protocol, and SimSiam on
ImageWoof at its runner-up learning rate.

    python -m experiments.confirm_table1 --results=results/table1 --readme=results/README.md

The protocol, committed before any of its runs; each record it adds names that commit
(`protocol_commit`: the commit that added this file) beside `git_commit` (the code that ran):
1. **Code and data path of the six-seed runs**: every run is made by experiments.reproduce_table1
   at CODE_COMMIT (the six-seed table's commit), in a git worktree of that commit (--code; made
   if missing), with the source images set to the mode `auto` chose for the six-seed runs on
   their 24 GiB hosts (SOURCE_IMAGES, recorded in each run's config): ImageNette in memory (the
   padded train split takes 0.73 GB), ImageWoof streamed with images over 256 px shrunk (its
   padded 392 x 615 canvas would take 6.53 GB, over a quarter of the RAM). So seeds 0-11 form
   one sample.
2. **Confirmation**: seeds 6-11 (never run before) of both datasets at each dataset's selected
   rates and epochs (no new selection: the selection records of --results are reused as they
   are), each seed with its random-init encoder.
3. **Sensitivity**: ImageWoof SimSiam at lr 0.4, its selection's runner-up (27.26 against 0.8's
   27.59 local-split top-1 at 6 epochs), 12 epochs, seeds 0-11; records in
   `<results>/sensitivity/`.
4. **Order** (so that a partial result already answers something): RUNS.
5. **Analysis** (experiments.table1_report with vi_simsiam_jax.evaluation.statistics, fixed
   with this protocol): per dataset over seeds 0-11, the paired top-1 difference VI-SimSiam -
   SimSiam with its 95% t interval (primary: ahead / behind / not resolved as the interval lies
   above 0, below 0 or around it), the exact two-sided Wilcoxon signed-rank p, a paired BCa
   bootstrap 95% interval, the t interval with each seed left out and over seeds 6-11 alone; the
   collapse flag (lowest z_std below 0.5) per run; the same against the sensitivity arm. If the
   ImageWoof verdict differs between SimSiam's two rates, the verdict says it depends on the rate.

Runs are made in <code>/runs/table1_six_seeds like the six-seed ones and resume from their
checkpoints. Each finished record is copied into --results with `protocol_commit`, `arm` and
`host_cpu` (the machine that finished it) added, after checking that the protocol's code,
rate, epochs and source images made it; a rerun skips finished records. --dry_run lists the
pending runs and their commands.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

from absl import app, flags, logging

from experiments import protocol, reporting, table1_report
from vi_simsiam_jax import datasets

CODE_COMMIT = "27738b20f3a6343f53cd533fbfbbe6279bcaecdf"
SOURCE_IMAGES = {"imagenette": "memory", "imagewoof": "stream"}
SENSITIVITY_LEARNING_RATE = {"imagewoof": 0.4}
# Where reproduce_table1 pretrains, relative to the worktree (the six-seed runs' folder).
WORKDIR = "runs/table1_six_seeds"

_CODE = flags.DEFINE_string("code", "runs/code-27738b2",
                            "The worktree of CODE_COMMIT that makes the runs (made if missing).")
_RESULTS = flags.DEFINE_string("results", "results/table1",
                               "Table 1's records: the selections are read, the runs added.")
_README = flags.DEFINE_string("readme", "", "If set, the file whose table1 block is rewritten.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the pending runs and their commands only.")


@dataclasses.dataclass(frozen=True)
class Run:
    """One call of reproduce_table1: a table cell's seed (SimSiam, VI-SimSiam and random init at
    the selected rates) or a sensitivity-arm seed (SimSiam at SENSITIVITY_LEARNING_RATE)."""

    dataset: str
    arm: str  # "confirmation" or "sensitivity"
    seed: int

    def records(self) -> dict[str, str]:
        """The record files it writes, by name, and the folder of --results each goes to."""
        if self.arm == "sensitivity":
            return {f"{self.dataset}_simsiam_seed{self.seed}.json": table1_report.SENSITIVITY_DIR}
        return {f"{self.dataset}_{method}_seed{self.seed}.json": ""
                for method in ("simsiam", "vi_simsiam", "random_init")}

    def arguments(self, staging: str) -> list[str]:
        """reproduce_table1's flags for this run (the arm's rate as a one-rate grid)."""
        common = [f"--workdir={WORKDIR}", f"--results={staging}", f"--datasets={self.dataset}",
                  f"--seeds={self.seed}",
                  f"--config.source_images={SOURCE_IMAGES[self.dataset]}"]
        if self.arm == "sensitivity":
            return common + ["--methods=simsiam", "--max_extensions=0",
                             f"--simsiam_learning_rates={SENSITIVITY_LEARNING_RATE[self.dataset]}"]
        return common


RUNS: tuple[Run, ...] = (
    *(Run("imagewoof", "sensitivity", seed) for seed in range(6)),
    *(Run("imagewoof", arm, seed) for seed in table1_report.CONFIRMATION_SEEDS
      for arm in ("confirmation", "sensitivity")),
    *(Run("imagenette", "confirmation", seed) for seed in table1_report.CONFIRMATION_SEEDS),
)


def _git(*args: str, cwd: str = str(reporting.REPO)) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def protocol_commit() -> str:
    """The commit that added this file; an error while the protocol has uncommitted changes."""
    files = [os.path.relpath(path, reporting.REPO) for path in
             (__file__, table1_report.__file__, table1_report.statistics.__file__)]
    commit = _git("log", "--diff-filter=A", "--format=%H", "-1", "--", files[0])
    if not commit or _git("status", "--porcelain", "--", *files):
        raise app.UsageError(f"The protocol ({', '.join(files)}) is not committed as it is: "
                             "commit it before its runs.")
    return commit


def code_worktree(path: str) -> str:
    """The worktree of CODE_COMMIT at path, made if missing; an error if it holds other code."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        _git("worktree", "add", "--detach", path, CODE_COMMIT)
    head = _git("rev-parse", "HEAD", cwd=path)
    if head != CODE_COMMIT or _git("status", "--porcelain", "--untracked-files=no", cwd=path):
        raise app.UsageError(f"--code={path} is not a clean checkout of {CODE_COMMIT} "
                             f"(HEAD {head}).")
    return path


def pending(results: str) -> list[Run]:
    return [run for run in RUNS if not all(
        os.path.exists(os.path.join(results, folder, name))
        for name, folder in run.records().items())]


def stage(run: Run, results: str, staging: str) -> None:
    """A results folder for reproduce_table1 holding what the run reuses: the dataset's
    selection records, the run's records already in results and, for the sensitivity arm, the
    seed's random-init record."""
    os.makedirs(staging, exist_ok=True)
    reused = [table1_report.selection_path(results, run.dataset, method)
              for method in ("simsiam", "vi_simsiam")]
    reused += [os.path.join(results, folder, name) for name, folder in run.records().items()]
    if run.arm == "sensitivity":
        reused.append(table1_report.record_path(results, run.dataset, "random_init", run.seed))
    for path in reused:
        if os.path.exists(path):
            shutil.copy(path, staging)


def host_cpu() -> str:
    """This machine's CPU model and whether it has AVX-512 (hosts with and without it round
    differently)."""
    with open("/proc/cpuinfo") as f:
        info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                    if ":" in line)
    info = {key.strip(): value.strip() for key, value in info.items()}
    isa = "AVX-512" if "avx512f" in info.get("flags", "").split() else "AVX2"
    return (f"{info.get('model name')} (family {info.get('cpu family')}, model "
            f"{info.get('model')}), {isa}")


def import_record(run: Run, name: str, folder: str, staging: str, results: str,
                  commit: str) -> None:
    """Copies a finished record into results, with protocol_commit, arm and host_cpu, after
    checking that the protocol's code, source images, learning rate and epochs (the selection's
    choice in results, or the sensitivity arm's rate) made it."""
    with open(os.path.join(staging, name)) as f:
        record = json.load(f)
    found = {"git_commit": record["git_commit"], "seed": record["seed"]}
    expected = {"git_commit": CODE_COMMIT, "seed": run.seed}
    if record["method"] != "random_init":
        found["source_images"] = record["config"]["source_images"]
        expected["source_images"] = SOURCE_IMAGES[run.dataset]
        found["settings"] = [record["learning_rate"], record["num_epochs"]]
        with open(table1_report.selection_path(results, run.dataset, record["method"])) as f:
            expected["settings"] = list(json.load(f)["chosen"].values())  # rate, epochs
    if run.arm == "sensitivity":
        expected["settings"][0] = SENSITIVITY_LEARNING_RATE[run.dataset]
        record["chosen_by"] = (f"{os.path.basename(__file__)}: SimSiam's runner-up rate in "
                               f"{record['chosen_by']}")
    if found != expected:
        raise RuntimeError(f"{name} was not made as the protocol says: {found} != {expected}.")
    record.update(protocol_commit=commit, arm=run.arm, host_cpu=host_cpu())
    protocol.write_json(os.path.join(results, folder, name), record)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = os.path.abspath(_RESULTS.value)
    todo = pending(results)
    if _DRY_RUN.value:
        for run in todo:
            print(f"{run.arm} {run.dataset} seed {run.seed}: python -m "
                  "experiments.reproduce_table1 " + " ".join(run.arguments("STAGING")))
        return
    commit = protocol_commit() if todo else ""
    code = code_worktree(_CODE.value) if todo else ""
    # The worktree's own default (<worktree>/../shared) is not this repository's.
    env = {**os.environ, datasets.DATASETS_ENV: str(datasets.default_archive_dir())}
    for run in todo:
        staging = os.path.join(code, "runs", "confirm_table1", f"{run.arm}_{run.dataset}_"
                               f"seed{run.seed}")
        stage(run, results, staging)
        logging.info("%s %s seed %d", run.arm, run.dataset, run.seed)
        subprocess.run([sys.executable, "-m", "experiments.reproduce_table1",
                        *run.arguments(staging)], cwd=code, env=env, check=True)
        for name, folder in run.records().items():
            if not os.path.exists(os.path.join(results, folder, name)):
                import_record(run, name, folder, staging, results, commit)
        print(protocol.write_table1_report(results, _README.value), flush=True)
    print(protocol.write_table1_report(results, _README.value))


if __name__ == "__main__":
    app.run(main)
