"""Deterministic, resumable tf.data pipelines for SimSiam pretraining and linear probing.

Every pipeline streams global batches of `batch_size` examples; global step `s` holds the
stream positions `s * batch_size + j`, and host `process_index` takes the slice
`j in [process_index * b, (process_index + 1) * b)` with `b = batch_size // process_count`.
Training streams visit a fresh permutation of the split each epoch
(`tf.random.experimental.index_shuffle` seeded by (seed, epoch)), dropping the last
incomplete batch of each epoch. All augmentation randomness comes from stateless ops seeded
by (seed, stream position), so a stream depends only on its arguments: the same seed gives
the same batches, and starting at `start_step=k` gives exactly the batches an uninterrupted
run yields from step k, whatever the number of hosts.

Each host's batches have leading shape [local_device_count, batch_size // (process_count *
local_device_count)], images are float32 NHWC normalised with ImageNet mean/std. Besides
images, every batch has "label" (int32) and "index" (int32, the example's position in
`examples`); eval batches also have "mask" (float32, 0 for padding).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import tensorflow as tf

from vi_simsiam_jax.datasets import Examples

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875
BLUR_SIGMA = (0.1, 2.0)  # SimSiam's (MoCo v2's) Gaussian-blur sigma range in pixels
BLUR_REFERENCE_SIZE = 224  # the crop size that range was set for
_BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])  # Gaussian kernel half-width in pixels.

Features = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Views per image: `n_global` crops at `global_size`, then `n_local` at `local_size`.

    Scales are the crop's fraction of the image area (torchvision RandomResizedCrop). Crop
    counts and sizes default to SwAV's ImageNet multi-crop (2x224 + 6x96). The scales are not
    SwAV's (0.14-1 global, 0.05-0.14 local): the global range is SimSiam's (0.2-1) and the local
    range (0.05-0.2) is the part below it, so local crops are the small crops that global crops
    never are, as in SwAV's split at 0.14. The experiment configs choose sizes for their data
    (experiments/configs/paper.py).

    blur_relative: False (default), the blur sigma is drawn from BLUR_SIGMA in output pixels
    whatever the crop size, as SimSiam's code (and SwAV's on its 96 px crops) does; True, that
    range is scaled by size / 224, so a crop is blurred as much relative to its content as a
    224 px crop is (0.03-0.57 px at 64 px, where the default blurs 3.5x more).
    """

    n_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.2, 1.0)
    n_local: int = 6
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.2)
    blur_relative: bool = False

    def __post_init__(self):
        for size, (low, high) in self.views():
            radius = math.ceil(3 * self.blur_sigma(size)[1])
            if size <= radius or not 0 < low <= high <= 1:
                raise ValueError(f"Bad crop size {size} (need > {radius}, the blur radius) or "
                                 f"scale ({low}, {high}) (need 0 < low <= high <= 1) in {self}.")

    def views(self) -> list[tuple[int, tuple[float, float]]]:
        """(size, scale) of each view, global crops first."""
        return ([(self.global_size, self.global_scale)] * self.n_global
                + [(self.local_size, self.local_scale)] * self.n_local)

    def blur_sigma(self, size: int) -> tuple[float, float]:
        """The Gaussian-blur sigma range, in pixels, of a view of `size` px."""
        if not self.blur_relative:
            return BLUR_SIGMA
        return tuple(sigma * size / BLUR_REFERENCE_SIZE for sigma in BLUR_SIGMA)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full global batches in one pass over `num_examples`."""
    return num_examples // batch_size


def pretrain_dataset(examples: Examples, *, batch_size: int, seed: int,
                     crops: MultiCropConfig = MultiCropConfig(), start_step: int = 0,
                     num_steps: int | None = None, process_index: int | None = None,
                     process_count: int | None = None, local_device_count: int | None = None,
                     num_threads: int | None = None) -> tf.data.Dataset:
    """Pretraining batches {"views": (global..., local...), "label", "index"}: SimSiam views.

    Each view is float32 [devices, per_device, size, size, 3]; infinite if num_steps is None.
    """
    def preprocess(image: tf.Tensor, rng: tf.Tensor) -> Features:
        rngs = _split(rng, len(crops.views()))
        return {"views": tuple(simsiam_augment(image, rngs[i], size, scale,
                                               crops.blur_sigma(size))
                               for i, (size, scale) in enumerate(crops.views()))}
    return _dataset(examples, preprocess, shuffle=True, batch_size=batch_size, seed=seed,
                    start_step=start_step, num_steps=num_steps, process_index=process_index,
                    process_count=process_count, local_device_count=local_device_count,
                    num_threads=num_threads)


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
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    devices = jax.local_device_count() if local_device_count is None else local_device_count
    n = len(examples)
    if batch_size % (process_count * devices):
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count * "
                         f"local_device_count = {process_count} * {devices}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    if shuffle and n < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the split's {n} examples.")
    host_batch = batch_size // process_count
    epoch_steps = steps_per_epoch(n, batch_size)
    images = tf.constant(examples.images.tolist(), dtype=tf.string)
    labels = tf.constant(examples.labels, dtype=tf.int32)
    aug_key = tf.constant([seed, 1], tf.int64)
    shuffle_key = tf.constant([seed, 0], tf.int64)

    def element(t: tf.Tensor) -> Features:
        step = t // host_batch
        j = process_index * host_batch + t % host_batch
        position = step * batch_size + j
        if shuffle:
            epoch = step // epoch_steps
            index = tf.random.experimental.index_shuffle(
                (step % epoch_steps) * batch_size + j,
                tf.random.experimental.stateless_fold_in(shuffle_key, epoch), n - 1)
        else:
            index = tf.minimum(position, n - 1)
        rng = tf.random.experimental.stateless_fold_in(aug_key, position)
        image = tf.io.decode_jpeg(tf.gather(images, index), channels=3,
                                  dct_method="INTEGER_ACCURATE")
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
    fits, else a centre crop with the aspect ratio clamped to `ratio`.
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

    (Upsampling gives the same result either way; the plain kernel is ~3x faster.)
    """
    image = tf.cast(image, tf.float32) / 255.0
    shrink = tf.reduce_any(tf.shape(image)[:2] > tf.convert_to_tensor(size, tf.int32))
    image = tf.cond(shrink, lambda: tf.image.resize(image, size, antialias=True),
                    lambda: tf.image.resize(image, size))
    return tf.clip_by_value(image, 0.0, 1.0)


@tf.function(autograph=False, reduce_retracing=True)
def simsiam_augment(image: tf.Tensor, rng: tf.Tensor, size: int, scale: tuple[float, float],
                    blur_sigma: tuple[float, float] = BLUR_SIGMA) -> tf.Tensor:
    """SimSiam's augmentation of a uint8 image into a normalised float32 [size, size, 3] view.

    RandomResizedCrop(size, scale), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with
    p=0.2, Gaussian blur (sigma uniform in blur_sigma, output pixels) with p=0.5, horizontal
    flip. A tf.function, so the graph is traced once per (size, scale, blur_sigma) and shared by
    the views.
    """
    keys = _split(rng, 7)
    image = random_resized_crop(image, keys[0], size, scale)
    image = _maybe(keys[1], 0.8, lambda x: color_jitter(x, keys[2]), image)
    image = _maybe(keys[3], 0.2, to_grayscale, image)
    sigma = tf.random.stateless_uniform([], keys[4], *blur_sigma)
    radius = math.ceil(3 * blur_sigma[1])
    image = _maybe(keys[5], 0.5, lambda x: gaussian_blur(x, sigma, radius), image)
    image = tf.image.stateless_random_flip_left_right(image, keys[6])
    return normalize(image)


def _maybe(rng: tf.Tensor, p: float, fn: Callable[[tf.Tensor], tf.Tensor],
           image: tf.Tensor) -> tf.Tensor:
    """fn(image) with probability p."""
    return tf.cond(tf.random.stateless_uniform([], rng) < p, lambda: fn(image), lambda: image)


def color_jitter(image: tf.Tensor, rng: tf.Tensor, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1) -> tf.Tensor:
    """torchvision ColorJitter on a [0, 1] image: the four adjustments in random order."""
    keys = _split(rng, 5)
    b = tf.random.stateless_uniform([], keys[0], 1 - brightness, 1 + brightness)
    c = tf.random.stateless_uniform([], keys[1], 1 - contrast, 1 + contrast)
    s = tf.random.stateless_uniform([], keys[2], 1 - saturation, 1 + saturation)
    h = tf.random.stateless_uniform([], keys[3], -hue, hue)
    order = tf.argsort(tf.random.stateless_uniform([4], keys[4]))
    for i in range(4):
        image = tf.switch_case(order[i], [
            lambda x=image: _blend(x, tf.zeros_like(x), b),
            lambda x=image: _blend(x, tf.reduce_mean(to_grayscale(x)), c),
            lambda x=image: _blend(x, to_grayscale(x), s),
            lambda x=image: tf.image.adjust_hue(x, h),
        ])
    return image


def _blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(factor * image + (1 - factor) * other, 0.0, 1.0)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma (torchvision's weights), repeated over 3 channels."""
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, radius: int = _BLUR_RADIUS) -> tf.Tensor:
    """Separable Gaussian blur with reflect padding; kernel radius (default 3 * max sigma of the
    augmentation) in pixels, below the image size."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel /= tf.reduce_sum(kernel)
    kernel = tf.tile(kernel[:, None, None, None], [1, 1, 3, 1])
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    blurred = tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1],
                                     "VALID")
    return blurred[0]
