"""Dataset preparation from fake archives/folders: counts, labels, conversion, errors."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tests import fake_archives, pretrain_utils
from vi_simsiam_jax import datasets, errors, loop

WNIDS = sorted(datasets.IMAGENETTE_CLASSES)


@pytest.fixture(scope="module", autouse=True)
def _no_progress_bars():
    tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def nette(tmp_path_factory):
    """A fake imagenette2-160.tgz (10 real wnids, extras in the first class), prepared."""
    tmp = tmp_path_factory.mktemp("nette")
    folder = tmp / "src" / "imagenette2-160"
    written = fake_archives.make_folder(folder, WNIDS, n_train=2, n_val=1)
    archive = fake_archives.make_archive(tmp / "imagenette2-160.tgz", folder)
    builder = datasets.prepare("imagenette", data_dir=str(tmp / "tfds"), archive=archive)
    return {"tmp": tmp, "folder": folder, "archive": archive, "written": written,
            "builder": builder}


def _expected_files(folder, split_dir):
    """Files a correct preparation keeps: all non-hidden files but the corrupt one."""
    return sorted(p.relative_to(folder).as_posix() for p in (folder / split_dir).rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.name != "corrupt.JPEG")


def test_archive_counts_and_labels(nette):
    summary = datasets.summary(nette["builder"])
    assert (summary["train"], summary["val"]) == (nette["written"]["train"],
                                                  nette["written"]["val"])
    assert summary["num_classes"] == 10 and summary["label_names"] == WNIDS
    assert summary["label_descriptions"][WNIDS.index("n01440764")] == "tench"
    for split, split_dir in (("train", "train"), ("val", "val")):
        examples = datasets.load_examples(nette["builder"], split)
        assert list(examples.file_names) == _expected_files(nette["folder"], split_dir)
        folder_labels = [WNIDS.index(f.split("/")[1]) for f in examples.file_names]
        np.testing.assert_array_equal(examples.labels, folder_labels)


def test_conversion_to_rgb_jpeg(nette):
    examples = datasets.load_examples(nette["builder"], "train")
    stored = dict(zip(examples.file_names, examples.images))
    for name in stored:
        with Image.open(io.BytesIO(stored[name])) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB"), name
        assert tf.io.decode_jpeg(stored[name]).shape[-1] == 3
    # RGB JPEGs are stored byte for byte; converted ones keep their content.
    first = f"train/{WNIDS[0]}/{WNIDS[0]}_0.JPEG"
    assert stored[first] == (nette["folder"] / first).read_bytes()
    for name in ("gray.png", "cmyk.JPEG"):
        original = Image.open(nette["folder"] / "train" / WNIDS[0] / name).convert("RGB")
        converted = Image.open(io.BytesIO(stored[f"train/{WNIDS[0]}/{name}"]))
        assert converted.size == original.size
        diff = np.abs(np.asarray(converted, np.float32) - np.asarray(original, np.float32))
        assert diff.mean() < 8
    assert datasets.summary(nette["builder"])["num_converted"] == 2


def test_corrupt_file_skipped_and_reported(nette):
    summary = datasets.summary(nette["builder"])
    assert summary["num_skipped"] == 1
    assert summary["skipped_files"] == [
        f"{nette['archive']}:imagenette2-160/{nette['written']['corrupt'][0]}"]


def test_local_validation_split(nette):
    train = datasets.load_examples(nette["builder"], "train")
    local_train = datasets.load_examples(nette["builder"], "local_train")
    local_val = datasets.load_examples(nette["builder"], "local_val")
    assert not set(local_train.file_names) & set(local_val.file_names)
    assert set(local_train.file_names) | set(local_val.file_names) == set(train.file_names)
    assert len(local_val) == round(0.2 * len(train))
    # Depends only on the names: a reversed list gives the same hold-out.
    names = train.file_names
    np.testing.assert_array_equal(datasets.local_val_mask(names[::-1])[::-1],
                                  datasets.local_val_mask(names))


def test_default_archive_location_and_reuse(nette, tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.DATASETS_ENV, str(nette["tmp"]))
    builder = datasets.prepare("imagenette", data_dir=str(tmp_path))
    assert builder.info.metadata["source"] == str(nette["archive"])
    assert datasets.summary(builder)["train"] == nette["written"]["train"]
    # Prepared data is reused: a later builder needs no source at all.
    monkeypatch.setenv(datasets.DATASETS_ENV, str(tmp_path / "nowhere"))
    again = datasets.prepare("imagenette", data_dir=str(tmp_path))
    assert datasets.summary(again)["train"] == nette["written"]["train"]


def test_extracted_folder_source(nette, tmp_path):
    parent = nette["folder"].parent  # holds imagenette2-160/
    builder = datasets.prepare("imagenette", data_dir=str(tmp_path), archive=parent)
    examples = datasets.load_examples(builder, "val")
    assert list(examples.file_names) == _expected_files(nette["folder"], "val")


def test_user_folder_without_val(tmp_path):
    folder = tmp_path / "my data"
    written = fake_archives.make_folder(folder, ["zebra", "apple", "mango"], n_train=3, n_val=0)
    builder = datasets.prepare(str(folder), data_dir=str(tmp_path / "tfds"))
    summary = datasets.summary(builder)
    assert summary["label_names"] == ["apple", "mango", "zebra"]
    assert (summary["train"], summary["val"]) == (written["train"], 0)
    examples = datasets.load_examples(builder, "train")
    names = [summary["label_names"][i] for i in examples.labels]
    assert names == [f.split("/")[1] for f in examples.file_names]
    with pytest.raises(ValueError, match="no 'val' split"):
        datasets.load_examples(builder, "val")


def test_unknown_class_in_archive_fails(tmp_path):
    folder = tmp_path / "imagewoof2-160"
    fake_archives.make_folder(folder, ["n99999999"], n_train=1, n_val=1, extras=False)
    with pytest.raises(ValueError, match="n99999999"):
        datasets.prepare("imagewoof", data_dir=str(tmp_path / "tfds"), archive=folder)


@pytest.mark.parametrize("dataset, archive", [
    ("imagenette", "missing/imagenette2-160.tgz"),
    ("missing/folder", None),
])
def test_missing_source_error_names_path(tmp_path, dataset, archive):
    dataset = dataset if archive else str(tmp_path / dataset)
    archive = archive and str(tmp_path / archive)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        datasets.prepare(dataset, data_dir=str(tmp_path / "tfds"), archive=archive)


def test_folder_without_train_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no train/"):
        datasets.prepare(str(tmp_path), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'"):
        datasets.get_builder("imagenet")


def test_prepare_data_prints_one_json_line(nette):
    """The CLI, run as a user would (reusing the prepared data): one JSON line on stdout."""
    result = pretrain_utils.run_module(
        "experiments.prepare_data", "--dataset=imagenette", f"--archive={nette['archive']}",
        f"--data_dir={nette['tmp'] / 'tfds'}")
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert summary["dataset"] == "imagenette"
    assert (summary["train"], summary["val"], summary["num_classes"]) == (
        nette["written"]["train"], nette["written"]["val"], 10)


def test_archive_members_in_any_order(tmp_path):
    """Archives need no top-level folder and may list val before train."""
    src = tmp_path / "src"
    fake_archives.make_folder(src, WNIDS[:1], n_train=1, n_val=2, extras=False)
    archive = tmp_path / "flat.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(src.rglob("*.JPEG"), reverse=True):
            tar.add(p, arcname=p.relative_to(src).as_posix())
    builder = datasets.prepare("imagenette", data_dir=str(tmp_path / "tfds"), archive=archive)
    assert (builder.info.splits["train"].num_examples,
            builder.info.splits["validation"].num_examples) == (1, 2)


def test_a_new_named_dataset_is_one_config_and_bounds_the_crops(tmp_path, monkeypatch):
    """An ImagesConfig added to NAMED_CONFIGS is found by name, its archive by its stem in
    $VI_SIMSIAM_DATASETS; pretraining refuses crops larger than its image_size (the field, not
    a size in the stem) before writing anything."""
    classes = ["a", "b"]
    new = datasets.ImagesConfig(
        name="tiny", description="A tiny named dataset.", label_names=tuple(classes),
        label_descriptions=tuple(classes), archive_stem="tiny2-99",
        url="https://example.invalid/tiny2-99.tgz", image_size=12)
    monkeypatch.setattr(datasets, "NAMED_CONFIGS", (*datasets.NAMED_CONFIGS, new))
    assert datasets.resolve_config("tiny") is new
    folder = tmp_path / "src" / new.archive_stem
    fake_archives.make_folder(folder, classes, n_train=2, n_val=1, extras=False)
    fake_archives.make_archive(tmp_path / f"{new.archive_stem}.tgz", folder)
    monkeypatch.setenv(datasets.DATASETS_ENV, str(tmp_path))
    config = pretrain_utils.config(("tiny", str(tmp_path / "tfds")))
    assert config.global_size > new.image_size >= config.local_size
    workdir = tmp_path / "work"
    with pytest.raises(errors.UserError, match=rf"config\.global_size = {config.global_size}: "
                       rf"larger than the {new.image_size} px images of tiny\."):
        loop.pretrain(config, str(workdir))
    assert not workdir.exists()
    assert datasets.get_builder("tiny", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_loading_unprepared_dataset_names_data_dir(tmp_path):
    builder = datasets.get_builder("imagewoof-320px", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(f"not prepared in {tmp_path}")):
        datasets.load_examples(builder, "train")


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_shard_is_named_and_no_run_starts(tmp_path, damage):
    """A tfds shard truncated or deleted after preparation: loading the split names the shard
    and how to recover, and experiments.pretrain (a real process) stops before training, with
    no checkpoint written."""
    folder = tmp_path / "images"
    fake_archives.make_folder(folder, ["a", "b"], n_train=8, n_val=2, size=24, extras=False)
    builder = datasets.prepare(str(folder), data_dir=str(tmp_path / "tfds"))
    shard = builder.info.splits["train"].filepaths[0]
    if damage == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2])
        message = f"shard {shard} holds .* examples of 16"
    else:
        shard.unlink()
        message = f"shard {shard} is missing"
    with pytest.raises(datasets.DamagedDatasetError, match=f"{message}.*Delete {builder.data_dir}"):
        datasets.load_examples(builder, "train")
    workdir = tmp_path / "run"
    completed = pretrain_utils.run_module(
        "experiments.pretrain", f"--config={pretrain_utils.REPO / 'tests' / 'tiny_config.py'}:"
        f"{folder}", f"--config.data_dir={tmp_path / 'tfds'}", f"--workdir={workdir}",
        check=False, timeout=300)
    assert completed.returncode != 0
    assert re.search(message, completed.stderr), completed.stderr[-2000:]
    assert not list(workdir.glob("checkpoints/*"))
