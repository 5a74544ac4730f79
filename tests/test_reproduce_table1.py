"""experiments.reproduce_table1 end to end on a tiny folder dataset: both methods pretrain, get
probed and a kNN curve; the random-init anchor, table, JSON and figure are written; a rerun
reuses every finished piece."""

import json
import subprocess
import sys

from tests import pretrain_utils


def _run(pretrain_data, workdir):
    folder, data_dir = pretrain_data
    command = [sys.executable, "-m", "experiments.reproduce_table1", f"--workdir={workdir}",
               f"--config={pretrain_utils.REPO / 'tests' / 'tiny_config.py'}:{folder}",
               f"--config.data_dir={data_dir}", "--config.keep_checkpoints=10",
               f"--datasets={folder}", "--probe_config.num_epochs=2",
               "--probe_config.lr_sweep=0.4,1.6", "--probe_config.knn_k=5"]
    completed = subprocess.run(command, cwd=pretrain_utils.REPO, env=pretrain_utils.ENV,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_table_curves_and_resume(pretrain_data, tmp_path):
    folder = pretrain_data[0]
    stdout = _run(pretrain_data, tmp_path)
    table = json.loads((tmp_path / "table1.json").read_text())
    results = table["results"][folder]
    assert set(results) == {"simsiam", "vi_simsiam", "random_init"}
    for method, result in results.items():
        assert 0 <= result["top1"] <= result["top5"] <= 100, (method, result)
        assert result["step"] == (0 if method == "random_init" else 8)  # 2 epochs x 4 steps
    for method in ("simsiam", "vi_simsiam"):
        curve = table["knn_curves"][folder][method]
        assert [step for step, _ in curve] == [2, 4, 6, 8]  # a checkpoint every 2 steps
        assert all(0 <= accuracy <= 100 for _, accuracy in curve)
        assert curve[-1][1] == results[method]["knn_top1"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    markdown = (tmp_path / "table1.md").read_text()
    assert markdown.count(f"| {folder} |") == 3 and markdown in stdout

    def outputs():  # the probes and kNN points, which a rerun must reuse, not recompute
        return {p: p.stat().st_mtime_ns for pattern in ("*/probe*.json", "*/knn_*.json")
                for p in tmp_path.glob(pattern)}

    before = outputs()
    assert len(before) == 2 * (1 + 3) + 1  # per method a probe and 3 kNN points; random init
    assert markdown in _run(pretrain_data, tmp_path)
    assert outputs() == before
