"""ImageNette, ImageWoof and ImageFolder-layout datasets, prepared once with TFDS.

All datasets go through one TFDS builder, registered as `vi_simsiam_images` (tfds's own
`imagenette` builder is left alone). Its configs are named `<family>-<size>`, e.g.
`imagenette-160px`, `imagewoof-320px`, `imagenette-full-size`; a user's folder gets a config
`folder-<name>-<hash of its path>`. Prepared data lives under
`<data_dir>/vi_simsiam_images/<config>/<version>/` (data_dir defaults to tfds's, i.e.
`$TFDS_DATA_DIR` or `~/tensorflow_datasets`) and is reused once written.

Sources: a named dataset's archive (`imagenette2-160.tgz`, ...) or its extracted folder,
found at `--archive`, else in `$VI_SIMSIAM_DATASETS` (default `<repo>/../shared/datasets`), else
downloaded from its config's `url`. A user's folder holds `train/<class>/*` and optionally
`val/<class>/*`. A named dataset is one `ImagesConfig` in `NAMED_CONFIGS`: class names, archive
stem, url and image size; `resolve_config` then finds it by its name.

Preparation policy:
- Labels are the sorted class-folder names (wnids for ImageNette/ImageWoof); human-readable
  descriptions are in `label_descriptions`.
- Every image is fully decoded with PIL. RGB JPEGs are stored byte-for-byte; any other
  readable image (grayscale, CMYK, PNG, ...) is converted to RGB and stored as JPEG.
- Unreadable or corrupt files are skipped and counted: each path is logged as a warning and
  listed in `info.metadata["skipped_files"]`, so training never meets them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from vi_simsiam_jax import errors

DATASETS_ENV = "VI_SIMSIAM_DATASETS"
URL_PREFIX = "https://s3.amazonaws.com/fast-ai-imageclas/"
JPEG_QUALITY = 95
LOCAL_VAL_FRACTION = 0.2
SPLITS = ("train", "val", "local_train", "local_val")

IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
IMAGEWOOF_CLASSES = {
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian ridgeback",
    "n02088364": "beagle",
    "n02089973": "English foxhound",
    "n02093754": "Border terrier",
    "n02096294": "Australian terrier",
    "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "dingo",
}
_FAMILIES = {"imagenette": IMAGENETTE_CLASSES, "imagewoof": IMAGEWOOF_CLASSES}
# fast.ai's variants: the shorter side their images are resized to (None: full size).
_SIZES = {"160px": 160, "320px": 320, "full-size": None}
# Folder names accepted for each TFDS split.
_SPLIT_DIRS = {"train": ("train",), "validation": ("val", "validation")}
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(eq=False)
class ImagesConfig(tfds.core.BuilderConfig):
    """A dataset: its class names and, for a named dataset, where its archive comes from.

    Of its own fields only `name` and `description` are written with prepared data (in
    dataset_info.json); the others describe the source, so adding one leaves prepared data
    valid.
    """

    label_names: tuple[str, ...] = ()
    label_descriptions: tuple[str, ...] = ()
    # e.g. 'imagenette2-160': <stem>.tgz, <stem>.tar.gz or folder <stem>; empty for a folder.
    archive_stem: str = ""
    url: str = ""  # the archive's download
    image_size: int | None = None  # the shorter side of its images; None: full size/unknown


def _fastai_config(family: str, size: str) -> ImagesConfig:
    classes = _FAMILIES[family]
    image_size = _SIZES[size]
    stem = f"{family}2" + (f"-{image_size}" if image_size else "")
    return ImagesConfig(
        name=f"{family}-{size}",
        description=f"fast.ai {family}2, {size} images.",
        label_names=tuple(sorted(classes)),
        label_descriptions=tuple(classes[k] for k in sorted(classes)),
        archive_stem=stem,
        url=f"{URL_PREFIX}{stem}.tgz",
        image_size=image_size,
    )


# Every named dataset (append a new one's ImagesConfig here).
NAMED_CONFIGS = tuple(_fastai_config(f, s) for f in _FAMILIES for s in _SIZES)


def default_archive_dir() -> pathlib.Path:
    """`$VI_SIMSIAM_DATASETS`, else `<repo root>/../shared/datasets`."""
    env = os.environ.get(DATASETS_ENV)
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def folder_config(path: str | os.PathLike[str]) -> ImagesConfig:
    """Config for a user's folder with `train/<class>/*` (and optionally `val/<class>/*`)."""
    root = pathlib.Path(path).expanduser().resolve()
    train = root / "train"
    if not train.is_dir():
        raise errors.MissingPath(
            f"Dataset folder {root} has no train/ subfolder. Expected the ImageFolder layout "
            f"{root}/train/<class>/<image> (and optionally {root}/val/<class>/<image>).",
            "dataset")
    names = tuple(sorted(p.name for p in train.iterdir() if p.is_dir() and not _hidden(p.name)))
    if not names:
        raise errors.UserError(
            f"{train} has no class subfolders (expected {train}/<class>/<image>).", "dataset")
    slug = re.sub(r"[^\w\-.]", "_", root.name)
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return ImagesConfig(name=f"folder-{slug}-{digest}", description=f"Image folder {root}.",
                        label_names=names, label_descriptions=names)


class VisImages(tfds.core.GeneratorBasedBuilder):
    """A named dataset (or an image folder) as RGB JPEG images with class labels."""

    name = "vi_simsiam_images"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = list(NAMED_CONFIGS)

    def __init__(self, *, source: str | os.PathLike[str] | None = None, **kwargs):
        """`source`: archive or folder to read; None downloads the config's url."""
        self._source = None if source is None else pathlib.Path(source)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=self.builder_config.label_names),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/fastai/imagenette",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source = self._source or self._download(dl_manager)
        if source.is_dir():
            root = _split_root(source, self.builder_config.archive_stem)
            iter_files = lambda: _iter_folder(root)
            location = f"{root}/"
            splits = [s for s, dirs in _SPLIT_DIRS.items()
                      if any((root / d).is_dir() for d in dirs)]
        else:
            iter_files = lambda: dl_manager.iter_archive(source)
            location = f"{source}:"
            splits = list(_SPLIT_DIRS)
        self.info.metadata["source"] = os.fspath(source)
        self.info.metadata["skipped_files"] = []
        self.info.metadata["num_converted"] = 0
        return {s: self._generate_examples(iter_files, s, location) for s in splits}

    def _download(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
        url = self.builder_config.url
        logging.warning("No %s.tgz or folder in %s: downloading %s (offline: use --archive).",
                        self.builder_config.archive_stem, default_archive_dir(), url)
        try:
            return pathlib.Path(dl_manager.download(url))
        except Exception as e:  # Errors differ by transport; all mean the same to the user.
            raise RuntimeError(
                f"Could not download {url}: {e}\nWhen offline, pass --archive=PATH to a local "
                f"{self.builder_config.archive_stem}.tgz (or its extracted folder), or put it in "
                f"{default_archive_dir()} (or ${DATASETS_ENV}).") from e

    def _generate_examples(self, iter_files: Callable[[], Iterator[tuple[str, io.IOBase]]],
                           split: str, location: str):
        """Yields the split's readable images; `location` prefixes file paths in messages."""
        labels = set(self.builder_config.label_names)
        found = 0
        for rel_path, fobj in iter_files():
            parts = rel_path.replace("\\", "/").split("/")
            if len(parts) < 3 or parts[-3] not in _SPLIT_DIRS[split] or _hidden(parts[-1]):
                continue
            label = parts[-2]
            if label not in labels:
                raise ValueError(f"{location}{rel_path}: class {label!r} is not one of the "
                                 f"{len(labels)} classes {sorted(labels)}.")
            found += 1
            key = "/".join(parts[-3:])
            try:
                image, converted = to_rgb_jpeg(fobj.read())
            except _PIL_ERRORS as e:
                logging.warning("Skipping unreadable image %s%s: %s", location, rel_path, e)
                self.info.metadata["skipped_files"].append(f"{location}{rel_path}")
                continue
            self.info.metadata["num_converted"] += int(converted)
            yield key, {"image": image, "label": label, "file_name": key}
        if not found:
            raise ValueError(f"{location} holds no images for split {split!r} (expected "
                             f"{'|'.join(_SPLIT_DIRS[split])}/<class>/<image>).")


def to_rgb_jpeg(data: bytes) -> tuple[bytes, bool]:
    """Returns (RGB JPEG bytes, whether re-encoded); raises if PIL cannot decode `data`."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # Full decode: catches truncated and corrupt files.
        if img.format == "JPEG" and img.mode == "RGB":
            return data, False
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), True


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _iter_folder(root: pathlib.Path) -> Iterator[tuple[str, io.IOBase]]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                yield path.relative_to(root).as_posix(), f


def _split_root(folder: pathlib.Path, archive_stem: str) -> pathlib.Path:
    """The folder holding train/ (`folder` itself or `folder/<archive_stem>`)."""
    for root in (folder, folder / archive_stem):
        if (root / "train").is_dir():
            return root
    raise FileNotFoundError(
        f"No train/ folder in {folder}" + (f" or {folder / archive_stem}" if archive_stem else "")
        + ". Expected the extracted archive layout <root>/train/<class>/<image>.")


def _find_local_archive(stem: str) -> pathlib.Path | None:
    base = default_archive_dir()
    for candidate in (base / f"{stem}.tgz", base / f"{stem}.tar.gz", base / stem):
        if candidate.exists():
            return candidate
    return None


def resolve_config(dataset: str) -> ImagesConfig:
    """`imagenette`/`imagewoof` (160px), a config name of NAMED_CONFIGS like
    `imagenette-320px`, or a folder."""
    by_name = {c.name: c for c in NAMED_CONFIGS}
    by_name.update({f: by_name[f"{f}-160px"] for f in _FAMILIES})
    if dataset in by_name:
        return by_name[dataset]
    if os.sep in dataset or "/" in dataset or os.path.exists(dataset):
        if not os.path.isdir(dataset):
            raise errors.MissingPath(f"Dataset folder {dataset} does not exist (expected "
                                     f"{dataset}/train/<class>/<image>).", "dataset")
        return folder_config(dataset)
    raise errors.UserError(f"Unknown dataset {dataset!r}: use one of {sorted(by_name)} or the "
                           "path of a folder laid out as <path>/train/<class>/<image>.",
                           "dataset")


def get_builder(dataset: str, *, data_dir: str | None = None,
                archive: str | os.PathLike[str] | None = None,
                download: bool = True) -> VisImages:
    """The builder for `dataset` (see `resolve_config`), reading `archive` if given.

    `archive` (a named dataset's .tgz or its extracted folder) only applies to named datasets;
    without it the archive is looked up in `default_archive_dir()`, then downloaded unless
    `download` is False (FileNotFoundError then, if the dataset is not prepared either).
    """
    config = resolve_config(dataset)
    if not config.archive_stem:
        if archive is not None:
            raise errors.UserError(
                f"An archive is only for named datasets, not folder {dataset}.", "archive")
        source = pathlib.Path(dataset)
    elif archive is not None:
        source = pathlib.Path(archive).expanduser()
        if not source.exists():
            raise errors.MissingPath(
                f"Archive {source} does not exist. Give the path of {config.archive_stem}.tgz "
                f"or of its extracted folder (download: {config.url}).",
                "archive")
    else:
        source = _find_local_archive(config.archive_stem)
    builder = VisImages(config=config, data_dir=data_dir, source=source)
    if source is None and not download and not builder.is_prepared():
        raise errors.MissingPath(
            f"Dataset {dataset} is neither prepared in {builder.data_dir_root} nor found as "
            f"{config.archive_stem}.tgz (or its folder) in {default_archive_dir()}: put the "
            f"archive there, set ${DATASETS_ENV} to its folder, or pass its path.", "archive")
    return builder


def prepare(dataset: str, *, data_dir: str | None = None,
            archive: str | os.PathLike[str] | None = None,
            download: bool = True) -> VisImages:
    """Prepares `dataset` into `data_dir` unless already there; returns its builder.

    TFDS's progress output goes to stderr, so stdout stays free for results.
    """
    builder = get_builder(dataset, data_dir=data_dir, archive=archive, download=download)
    with contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def prepare_from_config(config: ml_collections.ConfigDict) -> VisImages:
    """`prepare` of the dataset a pretraining config names (config.dataset, data_dir, archive)."""
    return prepare(config.dataset, data_dir=config.data_dir or None,
                   archive=config.archive or None)


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split held in memory: encoded RGB JPEGs, labels, and file names (sorted)."""

    images: np.ndarray  # object array of JPEG bytes
    labels: np.ndarray  # int32
    file_names: np.ndarray  # object array of str, e.g. 'train/n01440764/x.JPEG'
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> Examples:
        return Examples(self.images[mask], self.labels[mask], self.file_names[mask],
                        self.label_names)


def local_val_mask(file_names: np.ndarray, fraction: float = LOCAL_VAL_FRACTION) -> np.ndarray:
    """Deterministic hold-out: the `fraction` of files with the smallest SHA-256 of their name.

    Depends only on the file names, so it is the same for any order, seed, or host.
    """
    order = sorted(range(len(file_names)),
                   key=lambda i: hashlib.sha256(file_names[i].encode()).digest())
    mask = np.zeros(len(file_names), dtype=bool)
    mask[order[:round(fraction * len(file_names))]] = True
    return mask


def load_examples(builder: VisImages, split: str) -> Examples:
    """Loads `split` (one of SPLITS) of a prepared builder into memory, sorted by file name.

    `local_train`/`local_val` are a disjoint 80%/20% partition of `train` (paper, 6.1).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{builder.info.full_name} is not prepared in {builder.data_dir_root}: run "
            "python -m experiments.prepare_data --dataset=... --data_dir=... first.")
    tfds_split = "validation" if split == "val" else "train"
    if tfds_split not in builder.info.splits:
        raise ValueError(f"{builder.info.full_name} has no {split!r} split "
                         f"(source {builder.info.metadata.get('source')}).")
    records = sorted(_read_split(builder, tfds_split))
    names, images, labels = zip(*records)
    examples = Examples(np.array(images, dtype=object), np.array(labels, dtype=np.int32),
                        np.array(names, dtype=object), tuple(builder.info.features["label"].names))
    if split.startswith("local_"):
        mask = local_val_mask(examples.file_names)
        examples = examples.subset(mask if split == "local_val" else ~mask)
    return examples


class DamagedDatasetError(OSError):
    """A prepared split whose shard files are missing, truncated or short of examples."""


def _read_split(builder: VisImages, tfds_split: str) -> list[tuple[str, bytes, int]]:
    """(file name, JPEG bytes, label) of every example of a prepared split; DamagedDatasetError
    naming the shard if a shard file is missing, unreadable or holds fewer examples than its
    dataset_info records."""
    info = builder.info.splits[tfds_split]
    advice = (f"Delete {builder.data_dir} and rerun: the dataset is prepared again from its "
              "source (or run experiments.prepare_data).")
    for path in info.filepaths:
        if not os.path.exists(path):
            raise DamagedDatasetError(f"Prepared dataset {builder.info.full_name} is damaged: "
                                      f"shard {path} is missing. {advice}")
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    try:
        records = [(r["file_name"].decode(), r["image"], r["label"]) for r in tfds.as_numpy(ds)]
    except tf.errors.OpError as error:
        records, cause = [], error.message
    else:
        cause = f"{len(records)} examples read, {info.num_examples} recorded"
    if len(records) != info.num_examples:
        for path, expected in zip(info.filepaths, info.shard_lengths):
            try:
                found = sum(1 for _ in tf.data.TFRecordDataset(os.fspath(path)))
            except tf.errors.OpError as error:
                found = f"unreadable ({error.message})"
            if found != expected:
                raise DamagedDatasetError(
                    f"Prepared dataset {builder.info.full_name} is damaged: shard {path} holds "
                    f"{found} examples of {expected}. {advice}")
        raise DamagedDatasetError(f"Prepared dataset {builder.info.full_name} is damaged "
                                  f"({cause}). {advice}")
    return records


def fingerprint(builder: VisImages) -> dict:
    """What identifies prepared data wherever it lives: the dataset's name, classes, and each
    split's examples and bytes (a run may resume on the same data moved elsewhere)."""
    info = builder.info
    return {"name": info.full_name, "label_names": list(builder.builder_config.label_names),
            "splits": {name: [split.num_examples, split.num_bytes]
                       for name, split in sorted(info.splits.items())}}


def summary(builder: VisImages) -> dict:
    """JSON-friendly summary: split sizes, classes, conversions and skipped files."""
    info = builder.info
    splits = info.splits
    n_train = splits["train"].num_examples
    n_local_val = round(LOCAL_VAL_FRACTION * n_train)
    config = builder.builder_config
    return {
        "config": config.name,
        "data_dir": os.fspath(builder.data_dir),
        "train": n_train,
        "val": splits["validation"].num_examples if "validation" in splits else 0,
        "local_train": n_train - n_local_val,
        "local_val": n_local_val,
        "num_classes": len(config.label_names),
        "label_names": list(config.label_names),
        "label_descriptions": list(config.label_descriptions),
        "num_converted": info.metadata.get("num_converted"),
        "num_skipped": len(info.metadata.get("skipped_files", [])),
        "skipped_files": list(info.metadata.get("skipped_files", [])),
        "source": info.metadata.get("source"),
    }
