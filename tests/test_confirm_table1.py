"""The confirmatory Table 1 protocol (experiments.confirm_table1): its plan, the checks on each
record it imports, and the committed records' provenance."""

import glob
import json
import os
import subprocess

import pytest

from experiments import confirm_table1, table1_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "results", "table1")


def test_plan_runs_the_protocol_in_its_order():
    runs = confirm_table1.RUNS
    pretraining = [(run, name) for run in runs for name in run.records()
                   if "random_init" not in name]
    assert len(pretraining) == 36
    assert runs[:6] == tuple(confirm_table1.Run("imagewoof", "sensitivity", seed)
                             for seed in range(6))
    assert {run.dataset for run in runs[6:18]} == {"imagewoof"}
    assert {(run.dataset, run.arm) for run in runs[18:]} == {("imagenette", "confirmation")}
    sensitivity = sorted(run.seed for run in runs if run.arm == "sensitivity")
    assert sensitivity == list(range(12))
    assert all(run.seed in table1_report.CONFIRMATION_SEEDS for run in runs
               if run.arm == "confirmation")
    arguments = confirm_table1.Run("imagewoof", "sensitivity", 3).arguments("S")
    assert {"--seeds=3", "--methods=simsiam", "--simsiam_learning_rates=0.4",
            "--max_extensions=0", "--config.source_images=stream"} <= set(arguments)


def _staged(tmp_path, name, **fields):
    record = {"dataset": "imagewoof", "method": "simsiam", "seed": 7, "learning_rate": 0.4,
              "num_epochs": 12, "chosen_by": "select_imagewoof_simsiam.json",
              "config": {"source_images": "stream"}, "git_commit": confirm_table1.CODE_COMMIT}
    record.update(fields)
    (tmp_path / "staging").mkdir(exist_ok=True)
    (tmp_path / "staging" / name).write_text(json.dumps(record))
    (tmp_path / "select_imagewoof_simsiam.json").write_text(
        json.dumps({"chosen": {"learning_rate": 0.8, "num_epochs": 12}}))


@pytest.mark.parametrize("field, value", [("git_commit", "0" * 40), ("learning_rate", 0.8),
                                          ("num_epochs", 6),
                                          ("config", {"source_images": "memory"}),
                                          ("seed", 6)])
def test_import_refuses_a_record_made_otherwise(tmp_path, field, value):
    _staged(tmp_path, "imagewoof_simsiam_seed7.json", **{field: value})
    run = confirm_table1.Run("imagewoof", "sensitivity", 7)
    with pytest.raises(RuntimeError, match="not made as the protocol says"):
        confirm_table1.import_record(run, "imagewoof_simsiam_seed7.json", "sensitivity",
                                     str(tmp_path / "staging"), str(tmp_path), "abc")
    assert not (tmp_path / "sensitivity").exists()


def test_import_adds_the_protocol_fields(tmp_path):
    _staged(tmp_path, "imagewoof_simsiam_seed7.json")
    run = confirm_table1.Run("imagewoof", "sensitivity", 7)
    confirm_table1.import_record(run, "imagewoof_simsiam_seed7.json", "sensitivity",
                                 str(tmp_path / "staging"), str(tmp_path), "abc")
    record = json.loads((tmp_path / "sensitivity" / "imagewoof_simsiam_seed7.json").read_text())
    assert record["protocol_commit"] == "abc" and record["arm"] == "sensitivity"
    assert record["chosen_by"].startswith("confirm_table1.py: SimSiam's runner-up rate in ")
    assert record["host_cpu"].endswith(("AVX2", "AVX-512"))


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_committed_records_name_a_protocol_committed_before_them():
    """Every record of seeds 6-11 and of the sensitivity arm was made by the six-seed code and
    names the commit that added the protocol, an ancestor of the commit that added it."""
    paths = [path for path in glob.glob(os.path.join(RESULTS, "*_seed*.json"))
             if json.load(open(path))["seed"] in table1_report.CONFIRMATION_SEEDS]
    paths += glob.glob(os.path.join(RESULTS, table1_report.SENSITIVITY_DIR, "*.json"))
    if not paths:
        pytest.skip("no record of the confirmatory protocol yet")
    protocol = _git("log", "--diff-filter=A", "--format=%H", "-1", "--",
                    "experiments/confirm_table1.py")
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        assert record["git_commit"] == confirm_table1.CODE_COMMIT, path
        assert record["protocol_commit"] == protocol, path
        added = _git("log", "--diff-filter=A", "--format=%H", "-1", "--", path)
        if added:  # committed: the protocol came first
            assert added != protocol, path
            _git("merge-base", "--is-ancestor", protocol, added)


def test_import_checks_the_selected_rate(tmp_path):
    _staged(tmp_path, "imagewoof_simsiam_seed7.json")  # lr 0.4, but 0.8 was selected
    run = confirm_table1.Run("imagewoof", "confirmation", 7)
    with pytest.raises(RuntimeError, match="not made as the protocol says"):
        confirm_table1.import_record(run, "imagewoof_simsiam_seed7.json", "",
                                     str(tmp_path / "staging"), str(tmp_path), "abc")
    _staged(tmp_path, "imagewoof_simsiam_seed7.json", learning_rate=0.8)
    confirm_table1.import_record(run, "imagewoof_simsiam_seed7.json", "",
                                 str(tmp_path / "staging"), str(tmp_path), "abc")
    assert json.loads((tmp_path / "imagewoof_simsiam_seed7.json").read_text())["arm"] == \
        "confirmation"
