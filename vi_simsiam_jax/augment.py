"""SimSiam's augmentations as pure JAX functions, run on the device inside the pretraining step.

The host hands the step uint8 source images (zero-padded to a common shape, each with its true
height and width) and their stream positions; `views` makes every view of every image. View `v`
of the image at stream position `p` draws its randomness from
`fold_in(fold_in(key, p), v)` only, so its random choices never depend on the batch the image
lands in, on the device that makes it, or on the number of devices. Nor do its pixels: every
sum over an image is either a matrix product of that image's own matrices or a pairwise sum in
an order fixed by the shapes (`_pairwise_sum`), never a reduction that XLA may vectorise
differently for another batch size (tests/test_augment.py: bit for bit on 1 and 8 devices).

Each view is torchvision's SimSiam pipeline (facebookresearch/simsiam, main_simsiam.py):
RandomResizedCrop(size, scale), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 (the four
adjustments in a random order), RandomGrayscale(p=0.2), Gaussian blur with p=0.5 (sigma uniform
in `MultiCropConfig.blur_sigma(size)`), RandomHorizontalFlip, ImageNet normalisation. Two
rearrangements that change no pixel: the flip is done by the resize (mirrored columns), which
commutes with the colour operations and the symmetric blur; and the crop and resize are two
matrix products whose weights hold the crop (no gather), so images of any size in one padded
batch cost the same.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import dm_pix
import jax
import jax.numpy as jnp

Array = jax.Array

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)  # SimSiam's (MoCo v2's) Gaussian-blur sigma range in pixels
BLUR_REFERENCE_SIZE = 224  # the crop size that range was set for


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
            radius = blur_radius(self.blur_sigma(size))
            if not radius < size or not 0 < low <= high <= 1:
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


def blur_radius(sigma_range: tuple[float, float]) -> int:
    """Half-width in pixels of the Gaussian kernel: 3 times the largest sigma."""
    return math.ceil(3 * sigma_range[1])


class ViewParams(NamedTuple):
    """The random choices behind one view (one image; vmapped: one row per image)."""

    box: Array  # int32 [4]: top, left, height, width of the crop in the source image
    flip: Array  # bool
    jitter: Array  # bool: colour jitter applied
    factors: Array  # float32 [4]: brightness, contrast, saturation factors; hue shift
    order: Array  # int32 [4]: the order of the four adjustments (0..3 as in `factors`)
    grayscale: Array  # bool
    blur: Array  # bool
    sigma: Array  # float32, pixels


def crop_box(key: Array, height: Array, width: Array, scale: tuple[float, float],
             ratio: tuple[float, float] = CROP_RATIO, attempts: int = CROP_ATTEMPTS) -> Array:
    """torchvision RandomResizedCrop.get_params: (top, left, height, width), int32.

    Tries `attempts` boxes of area fraction uniform in `scale` and log-uniform aspect ratio in
    `ratio` and takes the first that fits, else the centre crop with the ratio clamped.
    """
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    h_f, w_f = height.astype(jnp.float32), width.astype(jnp.float32)
    area = h_f * w_f * jax.random.uniform(area_key, (attempts,), minval=scale[0],
                                          maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(ratio_key, (attempts,), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    crop_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    crop_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = jnp.argmax(fits)
    found = jnp.any(fits)
    in_ratio = w_f / h_f
    fallback_w = jnp.where(in_ratio > ratio[1], jnp.round(h_f * ratio[1]).astype(jnp.int32),
                           width)
    fallback_h = jnp.where(in_ratio < ratio[0], jnp.round(w_f / ratio[0]).astype(jnp.int32),
                           height)
    crop_h = jnp.where(found, crop_h[first], fallback_h)
    crop_w = jnp.where(found, crop_w[first], fallback_w)
    top = jnp.where(found, jax.random.randint(top_key, (), 0, height - crop_h + 1),
                    (height - crop_h) // 2)
    left = jnp.where(found, jax.random.randint(left_key, (), 0, width - crop_w + 1),
                     (width - crop_w) // 2)
    return jnp.stack([top, left, crop_h, crop_w]).astype(jnp.int32)


def sample_view_params(key: Array, height: Array, width: Array, scale: tuple[float, float],
                       blur_sigma: tuple[float, float]) -> ViewParams:
    """The random choices of one SimSiam view of a height x width image."""
    keys = jax.random.split(key, 8)
    low = jnp.array([1 - JITTER[0], 1 - JITTER[1], 1 - JITTER[2], -JITTER[3]])
    high = jnp.array([1 + JITTER[0], 1 + JITTER[1], 1 + JITTER[2], JITTER[3]])
    return ViewParams(
        box=crop_box(keys[0], height, width, scale),
        flip=jax.random.uniform(keys[1]) < FLIP_P,
        jitter=jax.random.uniform(keys[2]) < JITTER_P,
        factors=jax.random.uniform(keys[3], (4,), minval=low, maxval=high),
        order=jax.random.permutation(keys[4], 4).astype(jnp.int32),
        grayscale=jax.random.uniform(keys[5]) < GRAYSCALE_P,
        blur=jax.random.uniform(keys[6]) < BLUR_P,
        sigma=jax.random.uniform(keys[7], minval=blur_sigma[0], maxval=blur_sigma[1]))


def _pairwise_sum(x: Array) -> Array:
    """The sum over axis 0 by halving (zero-padded to a power of two): elementwise additions
    in an order fixed by the shape alone. XLA's reductions sum in an order that depends on how
    it vectorises the whole batch, so a view's pixels would depend on the batch it is in."""
    length = 1 << (x.shape[0] - 1).bit_length()
    x = jnp.pad(x, [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    while x.shape[0] > 1:
        x = x[:x.shape[0] // 2] + x[x.shape[0] // 2:]
    return x[0]


def resize_weights(start: Array, length: Array, in_size: int, out_size: int,
                   dtype: jnp.dtype = jnp.float32) -> Array:
    """[out_size, in_size] weights of an antialiased bilinear resize of the pixels
    [start, start + length) to out_size pixels, as tf.image.resize(antialias=True): half-pixel
    centres, a triangle kernel widened by the shrink factor, weights renormalised inside the
    crop."""
    scale = length.astype(dtype) / out_size
    radius = jnp.maximum(scale, 1.0)
    centres = start + (jnp.arange(out_size, dtype=dtype) + 0.5) * scale - 0.5
    pixels = jnp.arange(in_size)
    weights = jnp.maximum(0.0, 1 - jnp.abs(pixels[None, :] - centres[:, None]) / radius)
    weights = jnp.where((pixels >= start) & (pixels < start + length), weights, 0.0)
    return weights / _pairwise_sum(weights.T)[:, None]


def crop_and_resize(image: Array, box: Array, size: int, flip: Array | bool = False) -> Array:
    """The crop `box` of a float [H, W, 3] image resized to [size, size, 3], mirrored
    left-right if `flip`: two matrix products, with no gather (the crop is in the weights)."""
    rows = resize_weights(box[0], box[2], image.shape[0], size, image.dtype)
    columns = resize_weights(box[1], box[3], image.shape[1], size, image.dtype)
    columns = jnp.where(flip, columns[::-1], columns)
    out = jnp.einsum("oh,hwc,pw->opc", rows, image, columns)
    return jnp.clip(out, 0.0, 1.0)


def grayscale(image: Array) -> Array:
    """ITU-R 601 luma (torchvision's weights), [H, W, 1]."""
    return dm_pix.rgb_to_grayscale(image)


def mean_luma(image: Array) -> Array:
    """The mean of `grayscale(image)` (torchvision's adjust_contrast blends with it), summed
    pairwise in a fixed order."""
    luma = grayscale(image)[..., 0]
    return _pairwise_sum(_pairwise_sum(luma)) / luma.size


def _blend(image: Array, other: Array, factor: Array) -> Array:
    return jnp.clip(factor * image + (1 - factor) * other, 0.0, 1.0)


def adjust(image: Array, op: Array, factor: Array) -> Array:
    """torchvision's adjust_brightness (op 0), adjust_contrast (1) or adjust_saturation (2) of
    a [0, 1] image: a blend with black, the mean luma, or the luma."""
    luma = grayscale(image)
    other = jnp.where(op == 0, 0.0, jnp.where(op == 1, mean_luma(image), luma))
    return _blend(image, other, factor)


def adjust_hue(image: Array, shift: Array) -> Array:
    """torchvision's adjust_hue: the hue (in turns) rotated by `shift`."""
    return jnp.clip(dm_pix.adjust_hue(image, shift), 0.0, 1.0)


def color_jitter(image: Array, factors: Array, order: Array) -> Array:
    """torchvision ColorJitter with fixed `factors` applied in `order`.

    Brightness, contrast and saturation before the hue in `order` run first, then the hue, then
    the rest: vmap evaluates every branch of a choice, so each stage is one `adjust` (with its op
    as data) and the costlier hue rotation is evaluated once. The stages run as `lax.scan`s
    because a loop carry is stored between iterations: unrolled, XLA:CPU fuses each stage into
    every reader of its output (the next stage reads it for the luma, its mean and the blend;
    the hue rotation reads it several times), so the earlier stages ran many times over
    (benchmarks/README.md, "Demo config: step and loop").
    """
    hue_stage = jnp.argmax(order == 3)
    image = image.astype(jnp.result_type(image, factors))  # one dtype through the scan carry

    def stages(image: Array, indices: Array, runs: Callable[[Array], Array]) -> Array:
        def stage(image: Array, index: Array) -> tuple[Array, None]:
            op = jnp.minimum(order[index], 2)
            return jnp.where(runs(index), adjust(image, op, factors[op]), image), None
        return jax.lax.scan(stage, image, indices)[0]

    image = stages(image, jnp.arange(3), lambda index: index < hue_stage)  # 3 never precedes it
    image = adjust_hue(image, factors[3])
    return stages(image, jnp.arange(1, 4), lambda index: index > hue_stage)  # 0 never follows


def blur_kernel(sigma: Array, radius: int, dtype: jnp.dtype = jnp.float32) -> Array:
    """The normalised Gaussian taps at offsets -radius ... radius."""
    offsets = jnp.arange(-radius, radius + 1, dtype=dtype)
    kernel = jnp.exp(-0.5 * jnp.square(offsets / jnp.asarray(sigma, dtype)))
    return kernel / _pairwise_sum(kernel)


def blur_matrix(sigma: Array, size: int, radius: int, dtype: jnp.dtype = jnp.float32) -> Array:
    """[size, size] Gaussian blur along one axis, kernel half-width `radius`, reflect padding
    (tf.pad REFLECT, the edge pixel not repeated): blurred = B @ image along that axis."""
    source = jnp.arange(size)[:, None] + jnp.arange(-radius, radius + 1)[None, :]
    source = jnp.abs(source)  # reflect at 0 ...
    source = jnp.where(source > size - 1, 2 * (size - 1) - source, source)  # ... and at size-1
    return jnp.sum(blur_kernel(sigma, radius, dtype)[None, :, None]
                   * jax.nn.one_hot(source, size, dtype=dtype), axis=1)


def _blur_axis(image: Array, kernel: Array, axis: int) -> Array:
    """Convolution along `axis` with the 2r + 1 taps of `kernel`, reflect padding."""
    radius = (len(kernel) - 1) // 2
    size = image.shape[axis]
    padding = [(0, 0)] * image.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(image, padding, mode="reflect")
    shifted = lambda tap: jax.lax.slice_in_dim(padded, tap, tap + size, axis=axis)
    out = kernel[0] * shifted(0)
    for tap in range(1, len(kernel)):
        out = out + kernel[tap] * shifted(tap)
    return out


def gaussian_blur(image: Array, sigma: Array, radius: int, apply: Array | bool = True) -> Array:
    """Separable Gaussian blur of an [H, W, C] image (reflect padding, as `blur_matrix`) if
    `apply`; otherwise the kernel is the unit tap, which returns the image exactly, so vmap
    needs no select over the image. Shifted sums, not matrix products: the same additions in
    the same order for every image, whatever the batch."""
    kernel = blur_kernel(sigma, radius, image.dtype)
    kernel = jnp.where(apply, kernel, (jnp.arange(-radius, radius + 1) == 0).astype(image.dtype))
    return _blur_axis(_blur_axis(image, kernel, 0), kernel, 1)


def normalize(image: Array) -> Array:
    """[0, 1] RGB -> ImageNet mean/std normalised."""
    return (image - jnp.array(MEAN_RGB)) / jnp.array(STDDEV_RGB)


def apply_view(image: Array, params: ViewParams, size: int, radius: int) -> Array:
    """One normalised [size, size, 3] view of a float [H, W, 3] image in [0, 1], in its dtype."""
    view = crop_and_resize(image, params.box, size, params.flip)
    view = jnp.where(params.jitter, color_jitter(view, params.factors, params.order), view)
    view = jnp.where(params.grayscale, jnp.broadcast_to(grayscale(view), view.shape), view)
    return normalize(gaussian_blur(view, params.sigma, radius, params.blur))


def view_keys(key: Array, positions: Array, view: int) -> Array:
    """The keys of view `view` of the images at stream `positions`."""
    return jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(key, p), view))(positions)


def views(images: Array, sizes: Array, positions: Array, key: Array,
          crops: MultiCropConfig) -> list[Array]:
    """Every view of a batch: uint8 [B, H, W, 3] images (true [height, width] in `sizes`,
    int32 [B, 2]), their stream `positions` [B] -> float32 [B, size, size, 3] per view, global
    crops first."""
    images = images.astype(jnp.float32) / 255
    out = []
    for v, (size, scale) in enumerate(crops.views()):
        sigma_range = crops.blur_sigma(size)
        params = jax.vmap(sample_view_params, in_axes=(0, 0, 0, None, None))(
            view_keys(key, positions, v), sizes[:, 0], sizes[:, 1], scale, sigma_range)
        out.append(jax.vmap(apply_view, in_axes=(0, 0, None, None))(
            images, params, size, blur_radius(sigma_range)))
    return out
