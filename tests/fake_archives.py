"""Tiny fake ImageNette-style datasets (folders and .tgz archives) for fast tests."""

from __future__ import annotations

import io
import pathlib
import tarfile

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, size: int, mode: str) -> Image.Image:
    """A smooth random image (JPEG-friendly), `size` high and `size + 4` wide."""
    coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
    return coarse.resize((size + 4, size), Image.Resampling.BILINEAR).convert(mode)


def make_folder(
    root: pathlib.Path,
    classes: list[str],
    *,
    n_train: int = 4,
    n_val: int = 2,
    size: int = 16,
    extras: bool = True,
    seed: int = 0,
) -> dict[str, object]:
    """Writes root/{train,val}/<class>/*.JPEG (random RGB JPEGs) and returns what it wrote.

    With `extras`, the first class of train also gets a grayscale PNG, a CMYK JPEG, a
    truncated (corrupt) JPEG and a hidden file, to exercise conversion and skipping.
    """
    rng = np.random.default_rng(seed)
    written = {"train": 0, "val": 0, "converted": 0, "corrupt": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes if n else ():  # n == 0: no folder for the split.
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                _image(rng, size, "RGB").save(folder / f"{c}_{i}.JPEG", quality=90)
            written[split] += n
    if extras:
        folder = root / "train" / classes[0]
        _image(rng, size, "L").save(folder / "gray.png")
        _image(rng, size, "CMYK").save(folder / "cmyk.JPEG")
        good = io.BytesIO()
        _image(rng, size, "RGB").save(good, format="JPEG")
        (folder / "corrupt.JPEG").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
        (folder / ".DS_Store").write_bytes(b"\0\1")
        written["train"] += 2
        written["converted"] += 2
        written["corrupt"].append(f"train/{classes[0]}/corrupt.JPEG")
    return written


def make_archive(path: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Packs `folder` as `path` (.tgz), with `folder.name` as the top-level directory."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path
