"""Deterministic, resumable input for SimSiam pretraining and linear probing.

Every stream is made of global batches of `batch_size` examples; global step `s` holds the
stream positions `s * batch_size + j`, and host `process_index` takes the slice
`j in [process_index * b, (process_index + 1) * b)` with `b = batch_size // process_count`.
Training streams visit a fresh permutation of the split each epoch (seeded by (seed, epoch)),
dropping the last incomplete batch of each epoch. A stream depends only on its arguments: the
same seed gives the same batches, and starting at `start_step=k` gives exactly the batches an
uninterrupted run yields from step k, whatever the number of hosts.

Pretraining (`pretrain_batches`) hands the step uint8 source images; the views are made on the
device (vi_simsiam_jax.augment), so the host only gathers images. Every source image has one
layout: decoded, shrunk if larger (antialiased, aspect ratio kept) to fit max_side x max_side,
and zero-padded to the split's canvas (`_fit`): the largest fitted height and width of the
split (`canvas`), a property of the data and max_side alone, never of the host. The images
come from one of two sources, chosen by `pretrain_source`, which give the same batches bit for
bit, so the same views:
- `SourceImages`: the split decoded and fitted once into a uint8 array in host memory (cached
  as .npy next to the prepared tfds data, so later runs do not decode again);
- `StreamedImages`: for a split too large for memory, tf.data decodes and fits each image as it
  is needed.
Probe and evaluation pipelines (`probe_train_dataset`, `eval_dataset`) decode and preprocess
on the host with tf.data.

Each host's batches have leading shape [local_device_count, batch_size // (process_count *
local_device_count)]. Pretraining batches hold "image" (uint8 [*canvas, 3], the fitted image
at the top-left, zero-padded), "size" (int32 [2], its fitted height and width),
"position" (int32, its stream position), "label" and "index" (int32, the example's position in
`examples`); probe and eval batches hold "image" (float32 NHWC normalised with ImageNet
mean/std), "label", "index", and for eval "mask" (float32, 0 for padding).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from vi_simsiam_jax import files
from vi_simsiam_jax.augment import CROP_RATIO, MEAN_RGB, STDDEV_RGB
from vi_simsiam_jax.datasets import Examples

EVAL_CROP_FRACTION = 0.875
SOURCES = ("auto", "memory", "stream")
# "auto" keeps a split in memory while its uint8 array takes at most this fraction of the
# host's RAM (a matter of speed only: both sources give the same batches).
MEMORY_FRACTION = 0.25

Features = dict[str, tf.Tensor]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SourceImages:
    """A split decoded into memory, each image fitted as `StreamedImages` fits it (`_fit`): at
    the top-left of the split's canvas, zero-padded."""

    images: np.ndarray  # uint8 [N, *canvas, 3]
    sizes: np.ndarray  # int32 [N, 2]: height and width after fitting
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class StreamedImages:
    """A split decoded as it is read, each image fitted into max_side x max_side and padded to
    the split's canvas (`_fit`)."""

    examples: Examples
    max_side: int

    def __len__(self) -> int:
        return len(self.examples)

    @functools.cached_property
    def canvas(self) -> tuple[int, int]:
        return canvas(self.examples, self.max_side)


def _decode(jpeg: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE")


def _fit(image: tf.Tensor, max_side: int, canvas_size: tuple[int, int]
         ) -> tuple[tf.Tensor, tf.Tensor]:
    """A uint8 image shrunk, if needed, to fit max_side x max_side (antialiased, aspect ratio
    kept; its size as `fitted_sizes` computes it) and padded to canvas_size; and that size."""
    shape = tf.shape(image)[:2]
    scale = tf.minimum(1.0, max_side / tf.cast(tf.reduce_max(shape), tf.float32))
    size = tf.clip_by_value(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32),
                            1, max_side)
    image = tf.cond(scale < 1, lambda: tf.cast(tf.round(tf.clip_by_value(
        tf.image.resize(image, size, antialias=True), 0, 255)), tf.uint8), lambda: image)
    return tf.image.pad_to_bounding_box(image, 0, 0, *canvas_size), size


def fitted_sizes(sizes: np.ndarray, max_side: int) -> np.ndarray:
    """int32 [N, 2]: the (height, width) that `_fit` gives images of `sizes`, in its float32
    arithmetic."""
    sizes = np.asarray(sizes, np.float32)
    scale = np.minimum(np.float32(1), np.float32(max_side) / sizes.max(axis=-1, keepdims=True))
    return np.clip(np.round(sizes * scale), 1, max_side).astype(np.int32)


def canvas(examples: Examples, max_side: int) -> tuple[int, int]:
    """The (height, width) every fitted source image of `examples` is padded to: the split's
    largest fitted height and width, so an image that fills it needs no padding (a split of
    one size holds its images as they are)."""
    height, width = fitted_sizes(jpeg_sizes(examples), max_side).max(axis=0)
    return int(height), int(width)


def jpeg_sizes(examples: Examples) -> np.ndarray:
    """int32 [N, 2] (height, width) of each image, read from the JPEG headers."""
    shapes = tf.data.Dataset.from_tensor_slices(examples.images.tolist()).map(
        lambda jpeg: tf.io.extract_jpeg_shape(jpeg)[:2], num_parallel_calls=tf.data.AUTOTUNE)
    return np.stack(list(shapes.as_numpy_iterator())).astype(np.int32).reshape(-1, 2)


def decode_images(examples: Examples, max_side: int = 256) -> SourceImages:
    """Decodes and fits (`_fit`) every image of `examples` into one uint8 array (tf.data, all
    cores): the images `StreamedImages(examples, max_side)` streams."""
    canvas_size = canvas(examples, max_side)
    images = np.zeros((len(examples), *canvas_size, 3), np.uint8)
    sizes = np.zeros((len(examples), 2), np.int32)
    fitted = tf.data.Dataset.from_tensor_slices(examples.images.tolist()).map(
        lambda jpeg: _fit(_decode(jpeg), max_side, canvas_size),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for i, (image, size) in enumerate(fitted.as_numpy_iterator()):
        images[i], sizes[i] = image, size
    return SourceImages(images, sizes, examples.labels)


def cached_images(examples: Examples, cache_dir: str, max_side: int = 256) -> SourceImages:
    """`decode_images(examples, max_side)`, saved once under cache_dir as .npy and
    memory-mapped after.

    The files are named by a hash of the split's file names and by max_side, so another split,
    a re-prepared dataset or another max_side gets its own (and the caches of the layout before
    `_fit`, named by the hash alone, are never read); each is written whole or not at all.
    """
    digest = hashlib.sha256("\n".join(examples.file_names).encode()).hexdigest()[:16]
    paths = {name: os.path.join(cache_dir, f"{digest}-fit{max_side}-{name}.npy")
             for name in ("images", "sizes")}
    if not all(os.path.exists(p) for p in paths.values()):
        logging.info("Decoding %d images into %s.", len(examples), cache_dir)
        decoded = decode_images(examples, max_side)
        os.makedirs(cache_dir, exist_ok=True)
        for name, path in paths.items():  # sizes last: its presence marks a complete pair
            with files.atomic_write(path, "wb") as f:  # a full disk: named, nothing left
                np.save(f, getattr(decoded, name))
    sizes = np.load(paths["sizes"])
    images = np.load(paths["images"], mmap_mode="r")
    if sizes.shape != (len(examples), 2) or images.shape != (len(examples),
                                                             *canvas(examples, max_side), 3):
        raise ValueError(f"Decoded-image cache {paths['images']} does not match the split's "
                         f"{len(examples)} images; delete it to decode again.")
    return SourceImages(images, sizes, examples.labels)


def pretrain_source(examples: Examples, source: str = "auto", *, cache_dir: str,
                    stream_max_side: int = 256) -> SourceImages | StreamedImages:
    """The pretraining images, each fitted into stream_max_side x stream_max_side on the
    split's canvas (in either source; the name is the config field's): in memory ("memory"),
    streamed ("stream"), or "auto": in memory when the uint8 array takes at most
    MEMORY_FRACTION of the host's RAM."""
    if source not in SOURCES:
        raise ValueError(f"Unknown image source {source!r}; expected one of {SOURCES}.")
    if source == "auto":
        height, width = canvas(examples, stream_max_side)
        array_bytes = len(examples) * height * width * 3
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        source = "memory" if array_bytes <= MEMORY_FRACTION * ram else "stream"
        logging.info("Pretraining images %s: %d x %dx%d uint8 = %.2f GB, host RAM %.1f GB.",
                     "in memory" if source == "memory" else "streamed", len(examples),
                     height, width, array_bytes / 1e9, ram / 1e9)
    if source == "memory":
        return cached_images(examples, cache_dir, stream_max_side)
    return StreamedImages(examples, stream_max_side)


def _host_slice(batch_size: int, process_index: int | None, process_count: int | None,
                local_device_count: int | None) -> tuple[np.ndarray, int]:
    """This host's positions j within a global batch, and its local device count."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    devices = jax.local_device_count() if local_device_count is None else local_device_count
    if batch_size % (process_count * devices):
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count * "
                         f"local_device_count = {process_count} * {devices}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    host_batch = batch_size // process_count
    return process_index * host_batch + np.arange(host_batch), devices


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which a training stream visits the examples in `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _training_indices(num_examples: int, batch_size: int, seed: int, start_step: int,
                      offsets: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(example indices, stream positions) of the `offsets` of each global step from start_step."""
    if num_examples < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the split's {num_examples} examples.")
    epoch_steps = steps_per_epoch(num_examples, batch_size)
    order, order_epoch = None, None
    for step in itertools.count(start_step):
        epoch, k = divmod(step, epoch_steps)
        if epoch != order_epoch:
            order, order_epoch = epoch_permutation(num_examples, seed, epoch), epoch
        yield order[k * batch_size + offsets], step * batch_size + offsets


def _per_device(batch: Batch, devices: int) -> Batch:
    return {k: v.reshape(devices, v.shape[0] // devices, *v.shape[1:]) for k, v in batch.items()}


def pretrain_batches(source: SourceImages | StreamedImages, *, batch_size: int, seed: int,
                     start_step: int = 0, process_index: int | None = None,
                     process_count: int | None = None,
                     local_device_count: int | None = None) -> Iterator[Batch]:
    """This host's pretraining batches from start_step on, endless (see the module docstring)."""
    offsets, devices = _host_slice(batch_size, process_index, process_count, local_device_count)
    indices = _training_indices(len(source), batch_size, seed, start_step, offsets)
    if isinstance(source, StreamedImages):
        yield from _streamed_batches(source, indices, len(offsets), devices)
        return
    for index, position in indices:
        yield _per_device({"image": source.images[index], "size": source.sizes[index],
                           "position": position.astype(np.int32),
                           "label": source.labels[index], "index": index.astype(np.int32)},
                          devices)


def _streamed_batches(source: StreamedImages, indices: Iterator[tuple[np.ndarray, np.ndarray]],
                      host_batch: int, devices: int) -> Iterator[Batch]:
    """tf.data decodes and fits each image of the index stream, on all cores, in order."""
    jpegs = tf.constant(source.examples.images.tolist(), dtype=tf.string)
    labels = tf.constant(source.examples.labels, dtype=tf.int32)
    canvas_size = source.canvas  # read here: tf.data traces `element` in graph mode

    def element(index: tf.Tensor, position: tf.Tensor) -> Features:
        image, size = _fit(_decode(tf.gather(jpegs, index)), source.max_side, canvas_size)
        return {"image": image, "size": size, "position": tf.cast(position, tf.int32),
                "label": tf.gather(labels, index), "index": tf.cast(index, tf.int32)}

    ds = tf.data.Dataset.from_generator(
        lambda: (pair for index, position in indices for pair in zip(index, position)),
        output_signature=(tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.int64)))
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    for batch in ds.as_numpy_iterator():
        yield _per_device(batch, devices)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full global batches in one pass over `num_examples`."""
    return num_examples // batch_size


def probe_train_dataset(examples: Examples, *, batch_size: int, seed: int,
                        image_size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                        start_step: int = 0, num_steps: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        local_device_count: int | None = None,
                        num_threads: int | None = None) -> tf.data.Dataset:
    """Linear-probe training batches {"image", "label", "index"}: random resized crop + flip.

    Infinite if num_steps is None.
    """
    def preprocess(image: tf.Tensor, rng: tf.Tensor) -> Features:
        crop_rng, flip_rng = _split(rng, 2)
        image = random_resized_crop(image, crop_rng, image_size, scale)
        return {"image": normalize(tf.image.stateless_random_flip_left_right(image, flip_rng))}
    return _dataset(examples, preprocess, shuffle=True, batch_size=batch_size, seed=seed,
                    start_step=start_step, num_steps=num_steps, process_index=process_index,
                    process_count=process_count, local_device_count=local_device_count,
                    num_threads=num_threads)


def eval_dataset(examples: Examples, *, batch_size: int, image_size: int = 224,
                 corruption: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 local_device_count: int | None = None,
                 num_threads: int | None = None) -> tf.data.Dataset:
    """One pass in order: resize shorter side to image_size / 0.875, centre crop.

    corruption(crop, rng), if given, maps the [0, 1] crop to a corrupted one before
    normalisation (evaluation.corruptions); rng is a stateless seed fixed by the image's
    position, so a corrupted pass is the same every time.
    Yields {"image", "label", "index", "mask"} for ceil(N / batch_size) steps; the last global
    batch is padded with copies of the last example, with mask 0.
    """
    def preprocess(image: tf.Tensor, rng: tf.Tensor) -> Features:
        image = center_crop(image, image_size)
        if corruption is not None:
            image = corruption(image, rng)
        return {"image": normalize(image)}
    return _dataset(examples, preprocess, shuffle=False, batch_size=batch_size, seed=0,
                    start_step=0, num_steps=num_eval_steps(len(examples), batch_size),
                    process_index=process_index, process_count=process_count,
                    local_device_count=local_device_count, num_threads=num_threads)


def num_eval_steps(num_examples: int, batch_size: int) -> int:
    """Steps of `eval_dataset`: every example once, the last batch padded."""
    return math.ceil(num_examples / batch_size)


def _dataset(examples: Examples, preprocess: Callable[[tf.Tensor, tf.Tensor], Features], *,
             shuffle: bool, batch_size: int, seed: int, start_step: int,
             num_steps: int | None, process_index: int | None, process_count: int | None,
             local_device_count: int | None, num_threads: int | None) -> tf.data.Dataset:
    """Decodes and preprocesses this host's share of the global stream, batched per device."""
    offsets, devices = _host_slice(batch_size, process_index, process_count, local_device_count)
    n = len(examples)
    if shuffle and n < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the split's {n} examples.")
    host_batch = len(offsets)
    epoch_steps = steps_per_epoch(n, batch_size)
    images = tf.constant(examples.images.tolist(), dtype=tf.string)
    labels = tf.constant(examples.labels, dtype=tf.int32)
    aug_key = tf.constant([seed, 1], tf.int64)
    shuffle_key = tf.constant([seed, 0], tf.int64)

    def element(t: tf.Tensor) -> Features:
        step = t // host_batch
        j = int(offsets[0]) + t % host_batch
        position = step * batch_size + j
        if shuffle:
            epoch = step // epoch_steps
            index = tf.random.experimental.index_shuffle(
                (step % epoch_steps) * batch_size + j,
                tf.random.experimental.stateless_fold_in(shuffle_key, epoch), n - 1)
        else:
            index = tf.minimum(position, n - 1)
        rng = tf.random.experimental.stateless_fold_in(aug_key, position)
        image = _decode(tf.gather(images, index))
        features = preprocess(image, rng)
        features["label"] = tf.gather(labels, index)
        features["index"] = tf.cast(index, tf.int32)
        if not shuffle:
            features["mask"] = tf.cast(position < n, tf.float32)
        return features

    start = start_step * host_batch
    ds = (tf.data.Dataset.range(start, start + num_steps * host_batch) if num_steps is not None
          else tf.data.Dataset.counter(start))
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True)
    ds = ds.map(lambda b: tf.nest.map_structure(
        lambda x: tf.reshape(x, [devices, host_batch // devices, *x.shape[1:]]), b))
    options = tf.data.Options()
    options.deterministic = True
    if num_threads is not None:
        options.threading.private_threadpool_size = num_threads
        options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _split(rng: tf.Tensor, num: int) -> list[tf.Tensor]:
    """`num` independent stateless seeds derived from `rng`."""
    return tf.unstack(tf.random.experimental.stateless_split(rng, num))


def normalize(image: tf.Tensor) -> tf.Tensor:
    """[0, 1] RGB -> ImageNet mean/std normalised."""
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def random_resized_crop(image: tf.Tensor, rng: tf.Tensor, size: int,
                        scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO,
                        attempts: int = 10) -> tf.Tensor:
    """torchvision RandomResizedCrop on a uint8 image; returns float32 [size, size, 3] in [0, 1].

    Tries `attempts` (area fraction, log-uniform aspect ratio) boxes and takes the first that
    fits, else a centre crop with the aspect ratio clamped to `ratio`. Its user is the linear
    probe's augmented training views (`probe_train_dataset`), made per image in tf.data on the
    host and batched as fixed-size crops; augment.py's JAX crop works on the device on padded
    source batches, which only the pretraining pipeline makes.
    """
    area_rng, ratio_rng, y_rng, x_rng = _split(rng, 4)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = h_f * w_f * tf.random.stateless_uniform([attempts], area_rng, scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([attempts], ratio_rng, math.log(ratio[0]),
                                            math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    in_ratio = w_f / h_f
    fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
    fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32),
                          height)
    found = tf.reduce_any(fits)
    crop_w = tf.where(found, crop_w[first], fallback_w)
    crop_h = tf.where(found, crop_h[first], fallback_h)
    top = tf.where(found, tf.random.stateless_uniform(
        [], y_rng, 0, height - crop_h + 1, dtype=tf.int32), (height - crop_h) // 2)
    left = tf.where(found, tf.random.stateless_uniform(
        [], x_rng, 0, width - crop_w + 1, dtype=tf.int32), (width - crop_w) // 2)
    crop = image[top:top + crop_h, left:left + crop_w]
    return _resize(crop, [size, size])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize the shorter side to round(size / 0.875), then take the central size x size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    resize = round(size / EVAL_CROP_FRACTION)
    new_shape = tf.cast(tf.round(shape * resize / tf.reduce_min(shape)), tf.int32)
    new_shape = tf.maximum(new_shape, resize)  # Guard against rounding below `resize`.
    image = _resize(image, new_shape)
    top = (new_shape[0] - size + 1) // 2
    left = (new_shape[1] - size + 1) // 2
    return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, 3])


def _resize(image: tf.Tensor, size) -> tf.Tensor:
    """Bilinear resize of a uint8 image to float32 in [0, 1], antialiased when shrinking.

    (Upsampling gives the same result either way, and the plain kernel is the cheaper one.)
    """
    image = tf.cast(image, tf.float32) / 255.0
    shrink = tf.reduce_any(tf.shape(image)[:2] > tf.convert_to_tensor(size, tf.int32))
    image = tf.cond(shrink, lambda: tf.image.resize(image, size, antialias=True),
                    lambda: tf.image.resize(image, size))
    return tf.clip_by_value(image, 0.0, 1.0)
