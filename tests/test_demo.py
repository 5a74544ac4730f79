"""experiments.demo (`make demo`) end to end on a tiny folder dataset: report.json with the probe,
the random-init baseline, the kNN monitor's curve, the kappa analysis and the figures."""

import json
import os
import subprocess
import sys

from experiments import demo_report
from tests import pretrain_utils


def test_demo_writes_the_report(pretrain_data, tmp_path):
    folder, data_dir = pretrain_data
    command = [sys.executable, "-m", "experiments.demo", f"--workdir={tmp_path}",
               f"--config={pretrain_utils.REPO / 'tests' / 'tiny_config.py'}:{folder}",
               f"--config.data_dir={data_dir}", "--config.eval_every_epochs=1",
               "--probe_config.num_epochs=2",
               "--probe_config.lr_sweep=1.6", "--probe_config.knn_k=5"]
    completed = subprocess.run(command, cwd=pretrain_utils.REPO, env=pretrain_utils.ENV,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("probe", "baseline"):
        assert 0 <= report[key]["top1"] <= report[key]["top5"] <= 100, report[key]
    assert report["pretrain"]["step"] == 8  # tiny config: 2 epochs x 4 steps
    assert list(report["knn_monitor"]) == ["4", "8"]
    assert report["kappa"]["kappa"]["min"] >= 1.0  # softplus + 1
    assert all(os.path.getsize(path) > 0 for path in report["figures"].values())
    assert "linear probe top-1/top-5" in completed.stdout
    assert demo_report.markdown(report).count("|") > 10

