"""experiments.reproduce_table1 end to end on a tiny folder dataset: the local-split selection
(a learning-rate grid, then epochs), two seeds per method with the random-init anchor, the
report and README block; a rerun reuses every record, even with the workdirs gone."""

import json
import shutil
import subprocess
import sys

from experiments import table1_report
from tests import pretrain_utils


def _run(pretrain_data, workdir, results, readme, seeds="0,1"):
    folder, data_dir = pretrain_data
    command = [sys.executable, "-m", "experiments.reproduce_table1", f"--workdir={workdir}",
               f"--results={results}", f"--readme={readme}",
               f"--config={pretrain_utils.REPO / 'tests' / 'tiny_config.py'}:{folder}",
               f"--config.data_dir={data_dir}", f"--datasets={folder}",
               f"--select_dataset={folder}", f"--seeds={seeds}", "--simsiam_learning_rates=0.01",
               "--vi_simsiam_learning_rates=0.01,0.02", "--num_epochs=2,1",
               "--probe_config.num_epochs=2", "--probe_config.lr_sweep=1.6",
               "--probe_config.knn_k=5"]
    completed = subprocess.run(command, cwd=pretrain_utils.REPO, env=pretrain_utils.ENV,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_selection_seeds_report_and_resume(pretrain_data, tmp_path):
    folder = table1_report.dataset_name(pretrain_data[0])
    workdir, results, readme = tmp_path / "runs", tmp_path / "results", tmp_path / "README.md"
    readme.write_text(f"# x\n{table1_report.README_BEGIN}\nold\n{table1_report.README_END}\n")
    stdout = _run(pretrain_data, workdir, results, readme)

    selections = table1_report.load_selections(str(results))
    grids = {"simsiam": [(0.01, 2)], "vi_simsiam": [(0.01, 2), (0.02, 2)]}
    for method, selection in selections.items():
        candidates = selection["candidates"]
        top1 = {(c["learning_rate"], c["num_epochs"]): c["probe"]["top1"] for c in candidates}
        best_lr = max(grids[method], key=top1.get)[0]  # learning rates compared at 2 epochs
        assert list(top1) == grids[method] + [(best_lr, 1)]
        epochs = max([2, 1], key=lambda e: top1[best_lr, e])
        assert selection["chosen"] == {"learning_rate": best_lr, "num_epochs": epochs}
        assert all(c["probe"]["eval_split"] == "local_val" and c["seed"] == 0
                   for c in candidates)
        assert 0 <= selection["random_init"]["top1"] <= 100

    runs = table1_report.load_runs(str(results))
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        (m, s) for m in ("random_init", "simsiam", "vi_simsiam") for s in (0, 1)]
    for run in runs:
        assert run["dataset"] == folder and run["probe"]["eval_split"] == "val"
        assert run["probe_config"]["seed"] == run["seed"] and run["git_commit"]
        assert 0 <= run["probe"]["top1"] <= run["probe"]["top5"] <= 100
        if run["method"] != "random_init":
            chosen = selections[run["method"]]["chosen"]
            assert (run["learning_rate"], run["num_epochs"]) == tuple(chosen.values())
            assert run["config"]["seed"] == run["seed"]
            assert run["curves"][-1]["step"] == 4 * run["num_epochs"]  # 4 steps per epoch
            if run["seed"] == 0:  # the chosen candidate's pretraining, probed on val
                assert run["workdir"] in [c["workdir"] for c in
                                          selections[run["method"]]["candidates"]]

    summary = json.loads((results / "table1.json").read_text())
    difference = summary["differences"][folder]["top1"]
    assert difference["seeds"] == [0, 1] and difference["interval"][0] < difference["mean"]
    assert summary["compute"]["pretraining_runs"] == 2 + 3 + 2  # candidates + seed-1 runs
    table = (results / "table1.md").read_text()
    assert table in stdout and table1_report.readme_table(str(readme)) == table
    assert (workdir / "curves.png").stat().st_size > 10_000

    records = {p: p.read_bytes() for p in results.glob("*.json") if p.name != "table1.json"}
    shutil.rmtree(workdir)  # a new machine: only the committed records are left
    random_init = results / f"{folder}_random_init_seed1.json"
    random_init.unlink()  # and one random-init probe still to run, without pretraining workdirs
    # seed 1 first: the finished selection keeps its seed 0
    assert table in _run(pretrain_data, workdir, results, readme, seeds="1,0")
    assert {p: p.read_bytes() for p in results.glob("*.json")
            if p.name != "table1.json"} == records
    assert not list(workdir.glob("*/*/checkpoints"))  # nothing was pretrained again
