"""The device augmentations against their definitions: torchvision's RandomResizedCrop
distribution and colour functions, tf.image's resize, colorsys's hue, scipy's Gaussian filter;
the rates and ranges of every random choice; views that depend only on (key, position, view)."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import tensorflow as tf
import torch

from tests.torchvision_import import import_torchvision
from vi_simsiam_jax import augment

torchvision = import_torchvision()
from torchvision.transforms import functional as F  # noqa: E402  (after import_torchvision)
SAMPLES = 4000
# float32 results of sums of at most a few tens of [0, 1] terms with weights summing to 1: a
# few units in the last place of 1.
TOLERANCE = 1e-5


def _keys(count: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), count)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(height, width, 3)).astype(np.float32)


def _torch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _numpy(image: torch.Tensor) -> np.ndarray:
    return image.numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("height,width,scale", [
    (160, 240, (0.2, 1.0)),  # global crops: tries fail when the box is taller than the image
    (160, 160, (0.05, 0.2)),  # local crops: every try fits
    (64, 400, (0.1, 0.5)),  # a panorama: most tries fail, often all ten (the fallback)
])
def test_crop_box_distribution_matches_torchvision(height, width, scale):
    boxes = np.asarray(jax.vmap(augment.crop_box, in_axes=(0, None, None, None))(
        _keys(SAMPLES), jnp.int32(height), jnp.int32(width), scale))
    torch.manual_seed(0)
    reference = np.array([
        torchvision.transforms.RandomResizedCrop.get_params(
            torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
        for _ in range(SAMPLES)])
    for name, measure in (("area fraction", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                          ("aspect ratio", lambda b: b[:, 3] / b[:, 2])):
        result = scipy.stats.ks_2samp(measure(boxes), measure(reference))
        assert result.pvalue > 1e-3, (name, result)
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
    assert np.all((h > 0) & (w > 0))
    if scale == (0.05, 0.2):  # no fallback: the position is uniform over the free range
        for start, free in ((top, height - h), (left, width - w)):
            spread = (start + np.random.default_rng(0).uniform(size=SAMPLES)) / (free + 1)
            assert scipy.stats.kstest(spread, "uniform").pvalue > 1e-3


def test_crop_box_fallback_is_the_centre_crop():
    # scale 1 and a 1:3 image: no 3/4..4/3 box covers it, so the crop is the centred 4:3 box
    # of full height (torchvision's fallback).
    box = augment.crop_box(jax.random.key(0), jnp.int32(60), jnp.int32(180), (1.0, 1.0))
    np.testing.assert_array_equal(box, [0, 50, 60, 80])


def test_view_param_rates_and_ranges():
    params = jax.vmap(augment.sample_view_params, in_axes=(0, None, None, None, None))(
        _keys(SAMPLES), jnp.int32(160), jnp.int32(160), (0.2, 1.0), (0.1, 2.0))
    params = jax.tree.map(np.asarray, params)
    # Rates within 4.5 binomial standard deviations.
    for name, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
        rate = getattr(params, name).mean()
        assert abs(rate - p) < 4.5 * np.sqrt(p * (1 - p) / SAMPLES), (name, rate)
    low, high = np.array([0.6, 0.6, 0.6, -0.1]), np.array([1.4, 1.4, 1.4, 0.1])
    factors = params.factors
    assert np.all((factors >= low) & (factors <= high))
    for i in range(4):  # uniform over the whole range
        u = (factors[:, i] - low[i]) / (high[i] - low[i])
        assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3
    assert np.all(np.sort(params.order, axis=1) == np.arange(4))
    first = np.bincount(params.order[:, 0], minlength=4) / SAMPLES  # each op first 1/4 of times
    assert np.all(np.abs(first - 0.25) < 4.5 * np.sqrt(0.25 * 0.75 / SAMPLES))
    sigma = (params.sigma - 0.1) / 1.9
    assert np.all((sigma >= 0) & (sigma <= 1))
    assert scipy.stats.kstest(sigma, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("box,size", [((10, 30, 100, 120), 64), ((5, 7, 20, 16), 48),
                                      ((0, 0, 160, 240), 32)])
def test_crop_and_resize_equals_tf_image(box, size):
    image = _image(160, 240)
    top, left, h, w = box
    expected = tf.image.resize(image[top:top + h, left:left + w], [size, size],
                               antialias=True).numpy()
    padded = np.pad(image, ((0, 40), (0, 20), (0, 0)))  # zero padding must not leak in
    result = augment.crop_and_resize(jnp.asarray(padded), jnp.array(box), size)
    np.testing.assert_allclose(result, np.clip(expected, 0, 1), atol=TOLERANCE)
    flipped = augment.crop_and_resize(jnp.asarray(padded), jnp.array(box), size, True)
    np.testing.assert_allclose(flipped, result[:, ::-1], atol=TOLERANCE)


def test_colour_adjustments_equal_torchvision():
    image = _image(24, 24)
    ours = {0: F.adjust_brightness, 1: F.adjust_contrast, 2: F.adjust_saturation}
    for op, reference in ours.items():
        for factor in (0.6, 1.0, 1.4):
            expected = _numpy(reference(_torch(image), factor))
            result = augment.adjust(jnp.asarray(image), jnp.int32(op), jnp.float32(factor))
            np.testing.assert_allclose(result, expected, atol=TOLERANCE)
    gray = augment.grayscale(jnp.asarray(image))
    np.testing.assert_allclose(gray, _numpy(F.rgb_to_grayscale(_torch(image))), atol=TOLERANCE)
    np.testing.assert_allclose(augment.mean_luma(jnp.asarray(image)), np.mean(gray),
                               atol=TOLERANCE)


@pytest.mark.parametrize("shift", [-0.1, -0.03, 0.05, 0.1])
def test_hue_rotation_equals_colorsys(shift):
    image = _image(16, 16)
    expected = np.array([[colorsys.hsv_to_rgb((h + shift) % 1, s, v) for h, s, v in
                          (colorsys.rgb_to_hsv(*pixel) for pixel in row)] for row in image])
    result = augment.adjust_hue(jnp.asarray(image), jnp.float32(shift))
    np.testing.assert_allclose(result, expected, atol=TOLERANCE)
    np.testing.assert_allclose(result, _numpy(F.adjust_hue(_torch(image), shift)),
                               atol=TOLERANCE)


def test_color_jitter_applies_the_four_in_order():
    image = _image(20, 20, seed=3)
    factors = np.array([1.3, 0.7, 1.2, 0.08], np.float32)
    functions = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        expected = _torch(image)
        for op in order:
            expected = functions[op](expected, float(factors[op]))
        result = augment.color_jitter(jnp.asarray(image), jnp.asarray(factors),
                                      jnp.array(order))
        np.testing.assert_allclose(result, _numpy(expected), atol=TOLERANCE)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_equals_scipy(sigma):
    image = _image(32, 32)
    radius = augment.blur_radius((0.1, 2.0))
    expected = scipy.ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="mirror",
                                             truncate=radius / sigma)
    result = augment.gaussian_blur(jnp.asarray(image), jnp.float32(sigma), radius)
    np.testing.assert_allclose(result, expected, atol=TOLERANCE)
    unblurred = augment.gaussian_blur(jnp.asarray(image), jnp.float32(sigma), radius, False)
    np.testing.assert_array_equal(unblurred, image)


def test_view_is_the_composition_of_its_parts():
    """A view with every choice fixed equals tf.image's crop and resize, then torchvision's
    jitter and grayscale, scipy's blur, the flip and the normalisation."""
    image = _image(160, 200, seed=5)
    params = augment.ViewParams(
        box=jnp.array([20, 30, 100, 90]), flip=jnp.bool_(True), jitter=jnp.bool_(True),
        factors=jnp.array([0.8, 1.3, 0.7, -0.06]), order=jnp.array([2, 3, 0, 1]),
        grayscale=jnp.bool_(True), blur=jnp.bool_(True), sigma=jnp.float32(1.2))
    radius = augment.blur_radius((0.1, 2.0))
    view = augment.apply_view(jnp.asarray(image), params, 40, radius)

    expected = tf.image.resize(image[20:120, 30:120], [40, 40], antialias=True).numpy()
    expected = _torch(np.clip(expected, 0, 1))
    for op, function in zip([2, 3, 0, 1], [F.adjust_saturation, F.adjust_hue,
                                           F.adjust_brightness, F.adjust_contrast]):
        expected = function(expected, float(params.factors[op]))
    expected = F.rgb_to_grayscale(expected, num_output_channels=3)
    expected = scipy.ndimage.gaussian_filter(_numpy(expected), (1.2, 1.2, 0), mode="mirror",
                                             truncate=radius / 1.2)[:, ::-1]
    expected = (expected - augment.MEAN_RGB) / augment.STDDEV_RGB
    np.testing.assert_allclose(view, expected, atol=TOLERANCE / min(augment.STDDEV_RGB))


def test_views_depend_on_key_position_and_view_only():
    crops = augment.MultiCropConfig(global_size=16, n_global=2, local_size=8, n_local=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 24, 30, 3), np.uint8)
    sizes = np.array([[24, 30], [20, 30], [24, 18], [24, 30], [12, 12], [24, 30]], np.int32)
    positions = np.array([40, 41, 42, 43, 44, 45], np.int32)
    key = jax.random.key(7)
    # Jitted as in the step (and compiled once per batch shape, not op by op).
    make_views = jax.jit(augment.views, static_argnums=4)
    views = make_views(images, sizes, positions, key, crops)
    assert [v.shape for v in views] == [(6, 16, 16, 3)] * 2 + [(6, 8, 8, 3)]
    assert all(v.dtype == jnp.float32 and np.isfinite(v).all() for v in views)
    # The same images in another order and batch: the same choices, the same views.
    order = [3, 5, 0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[order], b),
                 _params(key, sizes, positions, crops),
                 _params(key, sizes[order], positions[order], crops))
    subset = make_views(images[order], sizes[order], positions[order], key, crops)
    for full, part in zip(views, subset):
        np.testing.assert_array_equal(np.asarray(full)[order], part)
    # The two global views of an image differ; another key changes them.
    assert not np.allclose(views[0], views[1])
    other = make_views(images, sizes, positions, jax.random.key(8), crops)
    assert not np.allclose(other[0], views[0])
    # Padding never shows: an image's views do not change when its padding does.
    repadded = images.copy()
    repadded[4, 12:] = 255
    repadded[4, :, 12:] = 255
    again = make_views(repadded, sizes, positions, key, crops)
    for a, b in zip(views, again):
        np.testing.assert_array_equal(a, b)


def test_views_equal_their_parts_composed_view_by_view():
    """`views` against the parts it is made of, composed here image by image and view by view:
    view v of the image at stream position p is drawn with the key fold_in(fold_in(key, p), v)
    at the global crops' size and scale for v < n_global, else at the local crops', blurred
    with sigma in BLUR_SIGMA over a 3 * 2.0 px radius, and made by crop and resize (mirrored
    if flipped), colour jitter, grayscale, blur and normalisation. Sizes and scales are taken
    from the config's fields, not from `MultiCropConfig.views()`, so a wrong assignment of
    either (local crops at the global scale, global and local sizes swapped) shows."""
    crops = augment.MultiCropConfig(global_size=16, n_global=2, global_scale=(0.2, 1.0),
                                    local_size=8, n_local=2, local_scale=(0.05, 0.2))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 20, 26, 3), np.uint8)
    sizes = np.array([[20, 26], [14, 26], [20, 9]], np.int32)
    positions = np.array([5, 17, 40], np.int32)
    key = jax.random.key(11)
    radius = 6  # ceil(3 * BLUR_SIGMA[1])

    def one_view(image, height, width, position, v, out_size, scale):
        view_key = jax.random.fold_in(jax.random.fold_in(key, position), v)
        params = augment.sample_view_params(view_key, height, width, scale, augment.BLUR_SIGMA)
        out = augment.crop_and_resize(image.astype(jnp.float32) / 255, params.box, out_size,
                                      params.flip)
        out = jnp.where(params.jitter, augment.color_jitter(out, params.factors, params.order),
                        out)
        out = jnp.where(params.grayscale, jnp.broadcast_to(augment.grayscale(out), out.shape),
                        out)
        out = augment.gaussian_blur(out, params.sigma, radius, params.blur)
        return (out - jnp.array(augment.MEAN_RGB)) / jnp.array(augment.STDDEV_RGB)

    one_view = jax.jit(one_view, static_argnums=(5, 6))  # a program per (size, scale)
    result = jax.jit(augment.views, static_argnums=4)(images, sizes, positions, key, crops)
    assert len(result) == crops.n_global + crops.n_local
    for v, made in enumerate(result):
        size, scale = ((crops.global_size, crops.global_scale) if v < crops.n_global
                       else (crops.local_size, crops.local_scale))
        expected = [one_view(images[i], sizes[i, 0], sizes[i, 1], positions[i], v, size, scale)
                    for i in range(len(images))]
        np.testing.assert_allclose(made, np.stack(expected),
                                   atol=TOLERANCE / min(augment.STDDEV_RGB), err_msg=f"view {v}")


def _params(key, sizes, positions, crops):
    return [jax.vmap(augment.sample_view_params, in_axes=(0, 0, 0, None, None))(
        augment.view_keys(key, positions, v), sizes[:, 0], sizes[:, 1], scale,
        crops.blur_sigma(size)) for v, (size, scale) in enumerate(crops.views())]


def test_views_identical_on_one_and_on_eight_devices():
    """Random choices and float32 pixels, bit for bit: 16 images on 1 device and 2 on each
    of 8 (the CPU tests' 8 devices)."""
    crops = augment.MultiCropConfig(global_size=16, n_global=2, local_size=8, n_local=2)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 20, 20, 3), np.uint8)
    sizes = rng.integers(9, 21, (16, 2)).astype(np.int32)
    positions = np.arange(100, 116, dtype=np.int32)
    key = jax.random.key(3)
    shard = lambda x: x.reshape(8, 2, *x.shape[1:])
    for make, inputs in (((lambda s, p: _params(key, s, p, crops)), (sizes, positions)),
                         ((lambda i, s, p: augment.views(i, s, p, key, crops)),
                          (images, sizes, positions))):
        one = jax.pmap(make, devices=jax.local_devices()[:1])(*(x[None] for x in inputs))
        eight = jax.pmap(make)(*(shard(x) for x in inputs))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(
            np.asarray(a).reshape(b.shape), b), one, eight)


def test_multi_crop_config_errors():
    with pytest.raises(ValueError, match="Bad crop size 4"):
        augment.MultiCropConfig(local_size=4)
    with pytest.raises(ValueError, match=r"scale \(0.5, 0.2\)"):
        augment.MultiCropConfig(global_scale=(0.5, 0.2))


def test_blur_sigma_in_pixels_or_relative_to_the_crop():
    pixels = augment.MultiCropConfig(global_size=16, n_global=2, local_size=8, n_local=2)
    assert pixels.blur_sigma(8) == pixels.blur_sigma(224) == augment.BLUR_SIGMA
    relative = augment.MultiCropConfig(global_size=16, n_global=2, local_size=8, n_local=2,
                                       blur_relative=True)
    assert relative.blur_sigma(224) == pytest.approx(augment.BLUR_SIGMA)
    assert relative.blur_sigma(64) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
