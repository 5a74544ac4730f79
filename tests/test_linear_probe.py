"""Linear probe: the head on synthetic features, top-k, restore and its errors, and the whole
evaluation (cached, online, random init) plus the kappa and OOD analyses on a tiny checkpoint,
with the files the experiment modules write from them."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open

from experiments import reporting, results_readme
from experiments.configs import probe as probe_config
from tests import fake_archives, pretrain_utils, tiny_config
from vi_simsiam_jax import checkpoints, datasets, run_config, train_state
from vi_simsiam_jax.evaluation import encoder, ood_report
from vi_simsiam_jax.evaluation import linear_probe as probe


def _config(**overrides):
    """The probe config at test size: batches divisible by the 8 test devices."""
    config = probe_config.get_config()
    config.update({"extract_batch_size": 8, "batch_size": 16, "num_epochs": 10, "lr_sweep": (),
                   **overrides})
    return config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A VI-SimSiam workdir (tiny model, 4-class folder dataset: 32 train, 16 val images) whose
    checkpoint at step 3 holds weights moved away from the initialisation: (workdir, variables)."""
    root = tmp_path_factory.mktemp("probe")
    folder = root / "images"
    fake_archives.make_folder(folder, ["a", "b", "c", "d"], n_train=8, n_val=4, size=24,
                              extras=False)
    datasets.prepare(str(folder), data_dir=str(root / "tfds"))
    config = tiny_config.get_config(str(folder))
    config.data_dir = str(root / "tfds")
    workdir = str(root / "work")
    os.makedirs(workdir)
    run_config.save_config(workdir, config)
    state = train_state.create_train_state(jax.random.key(config.seed), config,
                                     train_state.make_model(config, axis_name=None))
    state = state.replace(step=3, params=jax.tree.map(lambda x: x + 0.01, state.params))
    manager = checkpoints.manager(workdir, config)
    manager.save(3, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    return workdir, {"params": state.params, "batch_stats": state.batch_stats}


@pytest.fixture(scope="module")
def probed(saved):
    """reporting.probe on the saved workdir, with a two-value lr sweep: (encoder, ProbeResult,
    the JSON written)."""
    return reporting.probe(saved[0], _config(lr_sweep=(0.4, 1.6)))


@pytest.fixture(scope="module")
def result(probed):
    return probed[2]


@pytest.mark.parametrize("batch_norm", [True, False])
def test_head_fits_linearly_separable_features(batch_norm):
    rng = np.random.default_rng(0)
    num_classes, dim = 6, 32
    means = 4.0 * rng.normal(size=(num_classes, dim))

    def sample(n):
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        return (means[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels

    (features, labels), (test_features, test_labels) = sample(600), sample(300)
    config = _config(batch_size=64, num_epochs=20, head_batch_norm=batch_norm)
    batches = probe.cached_batches(features, labels, config.batch_size, config.seed)
    head = probe.fit_linear_head(batches, config.num_epochs * (600 // 64), dim, num_classes,
                                 config.learning_rate, config)
    untrained = probe.create_head_state(jax.random.key(0), dim, num_classes,
                                        probe.lars_optimizer(1.0, 1, config), batch_norm)
    before = probe.accuracy(np.asarray(probe.head_logits(untrained, test_features)), test_labels)
    after = probe.accuracy(np.asarray(probe.head_logits(head, test_features)), test_labels)
    assert before["top1"] < 50.0
    assert after["top1"] == 100.0
    assert after["top5"] >= after["top1"]


def test_head_batch_norm_variant_trains_and_keeps_running_statistics():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 256).astype(np.int32)
    features = (100.0 + 3.0 * labels[:, None] * np.ones((1, 8))
                + rng.normal(size=(256, 8))).astype(np.float32)
    config = _config(batch_size=32, head_batch_norm=True)
    head = probe.fit_linear_head(probe.cached_batches(features, labels, 32, 0), 400, 8, 2, 1.6,
                                 config)
    assert np.all(np.asarray(head.batch_stats["bn"]["mean"]) > 99.0)
    logits = np.asarray(probe.head_logits(head, features))
    assert probe.accuracy(logits, labels)["top1"] > 90.0


def test_topk_correct_by_hand():
    logits = np.array([[0.1, 3.0, 2.0, 0.0], [5.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    labels = np.array([1, 2, 0])
    np.testing.assert_array_equal(probe.topk_correct(logits, labels, 1), [True, False, False])
    np.testing.assert_array_equal(probe.topk_correct(logits, labels, 2), [True, False, False])
    np.testing.assert_array_equal(probe.topk_correct(logits, labels, 3), [True, True, False])
    np.testing.assert_array_equal(probe.topk_correct(logits, labels, 9), [True] * 3)


def test_restore_returns_the_saved_weights(saved):
    workdir, expected = saved
    config = run_config.load_config(workdir)
    variables, step = encoder.restore_encoder(workdir, config,
                                            train_state.make_model(config, axis_name=None))
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_restoring_the_encoder_builds_no_optimizer(saved, monkeypatch):
    """Evaluation reads params and batch_stats only (orbax partial restore)."""
    def no_optimizer(*args, **kwargs):
        raise AssertionError("an optimiser was built")

    monkeypatch.setattr(train_state, "make_optimizer", no_optimizer)
    frozen = encoder.load(saved[0])
    assert frozen.step == 3 and set(frozen.variables) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, frozen.variables, saved[1])


def test_run_writes_result_and_predictions(saved, result):
    workdir, _ = saved
    assert result["output"] == os.path.join(workdir, "probe.json")
    with open(result["output"]) as f:
        written = json.load(f)
    assert written["top1"] == result["top1"]
    assert (written["step"], written["num_train"], written["num_val"]) == (3, 32, 16)
    assert 0.0 <= written["top1"] <= written["top5"] <= 100.0
    assert 0.0 <= written["knn_top1"] <= 100.0
    assert written["image_size"] == 16  # the pretraining global crop size
    assert set(written["lr_sweep_local_val_top1"]) == {"0.4", "1.6"}
    assert written["learning_rate"] in (0.4, 1.6)
    with np.load(result["predictions"]) as data:
        assert data["logits"].shape == (16, 4)
        assert data["kappa"].shape == (16,) and np.all(data["kappa"] >= 1.0)
        accuracy = probe.accuracy(data["logits"], data["labels"])
        assert accuracy["top1"] == pytest.approx(written["top1"])
        assert sorted(data["file_names"])[0].startswith("val/a/")


def test_the_result_in_memory_is_what_was_written(probed):
    _, in_memory, written = probed
    assert in_memory.logits.shape == (16, 4) and in_memory.train.features.shape[0] == 32
    assert written["top1"] == in_memory.metrics["top1"]
    np.testing.assert_array_equal(np.asarray(probe.head_logits(in_memory.head,
                                                               in_memory.scored.features)),
                                  in_memory.logits)


def test_random_init_and_online_mode(saved, result, tmp_path):
    workdir, _ = saved
    _, _, random = reporting.probe(workdir, _config(num_epochs=2), random_init=True)
    assert random["output"] == os.path.join(workdir, "probe_random_init.json")
    assert random["random_init"] and random["step"] == 0
    with np.load(random["predictions"]) as a, np.load(result["predictions"]) as b:
        assert not np.allclose(a["kappa"], b["kappa"])  # another encoder
    _, _, online = reporting.probe(workdir, _config(mode="online", num_epochs=1),
                                   output=str(tmp_path / "online.json"))
    assert "knn_top1" not in online
    assert 0.0 <= online["top1"] <= online["top5"] <= 100.0


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_local_val_evaluation_never_reads_val(saved, mode, monkeypatch):
    """eval_split="local_val": the result is the best sweep head on the 20% local split of train;
    no val image goes through the encoder."""
    workdir, _ = saved
    seen = []
    extract = encoder.centre_crop_features
    monkeypatch.setattr(encoder, "centre_crop_features", lambda model, variables, examples, **kw: (
        seen.extend(str(n) for n in examples.file_names), extract(model, variables, examples,
                                                                   **kw))[1])
    _, _, local = reporting.probe(workdir, _config(eval_split="local_val", lr_sweep=(0.4, 1.6),
                                                   mode=mode,
                                                   num_epochs=2 if mode == "online" else 10))
    assert seen and not any(name.startswith("val/") for name in seen)
    assert local["output"] == os.path.join(workdir, "probe_local_val.json")
    assert local["eval_split"] == "local_val"
    assert local["top1"] == max(local["lr_sweep_local_val_top1"].values())
    with np.load(local["predictions"]) as data:
        names = list(data["file_names"])
    assert len(names) == local["num_val"] and local["num_train"] + local["num_val"] == 32
    assert all(name.startswith("train/") for name in names)
    with pytest.raises(ValueError, match="lr_sweep"):
        reporting.probe(workdir, _config(eval_split="local_val", lr_sweep=()))


def test_kappa_analysis_of_the_probe_in_memory(probed, result, tmp_path):
    frozen, in_memory, _ = probed
    summary = reporting.write_kappa_analysis(frozen, in_memory, str(tmp_path), num_images=4)
    for path in summary["files"].values():
        assert os.path.getsize(path) > 0
    with open(summary["files"]["summary"]) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["probe_top1"] == pytest.approx(result["top1"])
    assert summary["num_val"] == 16 and len(summary["lowest_kappa"]) == 4
    assert summary["lowest_kappa"][0]["kappa"] <= summary["highest_kappa"][0]["kappa"]
    assert summary["lowest_kappa"][0]["kappa"] == pytest.approx(in_memory.scored.kappa.min())
    assert summary["accuracy_at_coverage"]["kappa"]["100%"] == pytest.approx(result["top1"])


def test_ood_analysis_writes_figures_and_json(saved, probed, tmp_path):
    frozen, in_memory, written = probed
    other = tmp_path / "other"
    fake_archives.make_folder(other, ["x", "y"], n_train=2, n_val=6, size=24, extras=False,
                              seed=5)
    train, _ = encoder.load_splits(frozen.config)
    analysis = ood_report.analyze(
        frozen, in_memory, train, ood=ood_report.load_ood_examples(str(other), frozen.config),
        corruptions=("contrast",), severities=(1, 5))
    summary = reporting.write_ood_analysis(analysis, written["workdir"], str(tmp_path / "out"))
    assert summary["workdir"] == written["workdir"] and summary["encoder_record"] is None
    assert summary["git_commit"] == reporting.git_commit()
    for path in summary["files"].values():
        assert os.path.getsize(path) > 0
    with open(summary["files"]["summary"]) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["clean"]["top1"] == written["top1"]
    assert summary["scores"] == list(ood_report.SCORES)
    assert summary["ood"]["split"] == "val" and summary["ood"]["num_images"] == 12
    for score in ood_report.SCORES:
        assert 0.0 <= summary["ood"]["detection"][score]["auroc"] <= 1.0
    curve = summary["corruptions"]["contrast"]
    assert [p["severity"] for p in curve] == [0, 1, 5]
    assert curve[0]["kappa_median"] == summary["clean"]["kappa_median"]
    assert curve[0]["detection"]["kappa"]["auroc"] == 0.5  # clean against itself
    # Severity 5 contrast, scored with the probe's head, is worse than clean.
    assert curve[2]["top1"] <= curve[0]["top1"]
    tables = results_readme.ood_markdown([summary], severities=(1, 5))
    kappa = summary["ood"]["detection"]["kappa"]
    assert f"| {kappa['auroc']:.3f} ({kappa['fpr_at_95_tpr']:.2f}) |" in tables
    assert f"| contrast | {curve[0]['top1']:.1f} / {curve[1]['top1']:.1f} / " in tables


def test_ood_analysis_errors(saved, probed, tmp_path, monkeypatch):
    frozen, in_memory, _ = probed
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ood_report.load_ood_examples(str(tmp_path / "nowhere"), frozen.config)
    monkeypatch.setenv(datasets.DATASETS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Dataset imagewoof is neither prepared .* "
                                                "imagewoof2-160.tgz"):
        ood_report.load_ood_examples("imagewoof", frozen.config)
    with pytest.raises(ValueError, match="is the pretraining dataset"):
        ood_report.load_ood_examples(frozen.config.dataset, frozen.config)
    with pytest.raises(ValueError, match="Unknown corruption 'fog'"):
        ood_report.analyze(frozen, in_memory, None, corruptions=("fog",))


def test_export_torch_writes_the_checkpoint_as_safetensors(saved, tmp_path):
    workdir, variables = saved
    out = tmp_path / "export" / "encoder.safetensors"
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.export_torch", f"--workdir={workdir}",
         f"--out={out}"], cwd=pretrain_utils.REPO, env=pretrain_utils.ENV, capture_output=True,
        text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.splitlines()[-1])["step"] == "3"
    with safe_open(str(out), "np") as f:
        assert f.metadata()["method"] == "vi_simsiam" and f.metadata()["stem"] == "cifar"
        assert f.metadata()["kappa"] == "true"
        np.testing.assert_array_equal(
            f.get_tensor("layer1.0.bn1.running_var"),
            variables["batch_stats"]["backbone"]["layer1_0"]["bn1"]["var"])
        fc2 = variables["params"]["predictor"]["fc2"]
        np.testing.assert_array_equal(f.get_tensor("predictor.3.weight"),
                                      np.asarray(fc2["kernel"]).T)


def test_missing_workdir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pretraining workdir"):
        reporting.probe(str(tmp_path / "nowhere"), _config())


def test_workdir_without_checkpoints(saved, tmp_path):
    shutil.copy(os.path.join(saved[0], "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="No checkpoints in .*--random_init"):
        reporting.probe(str(tmp_path), _config())


def test_checkpoint_of_another_architecture(saved, tmp_path):
    shutil.copytree(os.path.join(saved[0], "checkpoints"), tmp_path / "checkpoints")
    config = run_config.load_config(saved[0])
    config.model.width = 8
    run_config.save_config(str(tmp_path), config)
    with pytest.raises(ValueError, match=r"another architecture .*params/backbone/bn1/bias: "
                                         r"checkpoint \(4,\), config \(8,\)"):
        reporting.probe(str(tmp_path), _config())


def test_bad_probe_config_names_the_field(saved):
    with pytest.raises(ValueError, match="config.mode"):
        reporting.probe(saved[0], _config(mode="finetune"))


def test_half_precision_encoder_gives_float32_features_close_to_float32(saved):
    """The probe's `half_precision`: the bfloat16 encoder's features are float32 and differ from
    the float32 encoder's by the roundoff of ~20 bfloat16 layers (unit roundoff 2^-8 each;
    BatchNorm renormalises in between, so the errors add rather than compound)."""
    features = {}
    for half_precision in (False, True):
        frozen = encoder.load(saved[0], half_precision=half_precision)
        assert jnp.dtype(frozen.model.dtype) == (jnp.bfloat16 if half_precision else jnp.float32)
        train_examples, _ = encoder.load_splits(frozen.config)
        features[half_precision] = frozen.features(train_examples, batch_size=8,
                                                   image_size=16).features
    assert features[True].dtype == np.float32
    error = np.linalg.norm(features[True] - features[False]) / np.linalg.norm(features[False])
    assert 0 < error <= 20 * 2.0**-8
