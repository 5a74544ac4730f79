"""tf.data pipelines: shapes, determinism, resumption, host sharding, augmentation ops."""

import io

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vi_simsiam_jax import datasets
from vi_simsiam_jax import input_pipeline as ip

N = 48  # examples; label i identifies example i.
CROPS = ip.MultiCropConfig(global_size=16, n_global=2, local_size=8, n_local=2)


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def examples() -> datasets.Examples:
    rng = np.random.default_rng(0)
    images = [_jpeg(rng, 20 + i % 5, 24 - i % 3) for i in range(N)]
    return datasets.Examples(np.array(images, dtype=object), np.arange(N, dtype=np.int32),
                             np.array([f"train/c/{i}.JPEG" for i in range(N)], dtype=object),
                             ("c",))


def _batches(ds: tf.data.Dataset) -> list:
    return list(ds.as_numpy_iterator())


def _pretrain(examples, **kwargs) -> list:
    args = dict(batch_size=16, seed=3, crops=CROPS, num_steps=4, local_device_count=2)
    return _batches(ip.pretrain_dataset(examples, **(args | kwargs)))


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(examples) -> list:
    """Steps 0..5 (2 epochs of 3 steps) of one host, uninterrupted."""
    return _pretrain(examples, num_steps=6)


def test_pretrain_shapes_and_values(reference):
    assert len(reference) == 6
    batch = reference[0]
    assert [v.shape for v in batch["views"]] == [(2, 8, 16, 16, 3)] * 2 + [(2, 8, 8, 8, 3)] * 2
    assert batch["label"].shape == (2, 8)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in batch["views"])
    # Normalised: values span roughly [-2.1, 2.7] with mean near 0.
    views = np.concatenate([v.ravel() for v in batch["views"]])
    assert -2.2 < views.min() < -1 and 1.5 < views.max() < 2.7 and abs(views.mean()) < 0.5
    # Views of one image differ from each other.
    assert not np.allclose(batch["views"][0], batch["views"][1])


def test_same_seed_same_batches_other_seed_differs(examples, reference):
    # A second pipeline, on one thread instead of autotuned ones: identical batches.
    _assert_same(_pretrain(examples, num_threads=1), reference[:4])
    other = _pretrain(examples, seed=4)
    assert not np.array_equal(other[0]["label"], reference[0]["label"])
    assert not np.allclose(other[0]["views"][0], reference[0]["views"][0])


def test_start_at_step_k_matches_uninterrupted(examples, reference):
    ds = ip.pretrain_dataset(examples, batch_size=16, seed=3, crops=CROPS, start_step=2,
                             local_device_count=2)  # infinite
    resumed = [b for b, _ in zip(ds.as_numpy_iterator(), range(4))]
    _assert_same(resumed, reference[2:])


def test_epochs_are_permutations(reference):
    steps_per_epoch = ip.steps_per_epoch(N, 16)
    epochs = [np.concatenate([b["label"].ravel() for b in reference[e * 3:(e + 1) * 3]])
              for e in range(2)]
    assert steps_per_epoch == 3
    for labels in epochs:
        np.testing.assert_array_equal(np.sort(labels), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1])


def test_two_hosts_disjoint_and_equal_to_one_host(examples, reference):
    one = reference[:3]
    hosts = [_pretrain(examples, num_steps=3, local_device_count=1, process_count=2,
                       process_index=i) for i in range(2)]
    labels = [np.concatenate([b["label"].ravel() for b in h]) for h in hosts]
    assert not set(labels[0]) & set(labels[1])
    assert set(labels[0]) | set(labels[1]) == set(range(N))
    # Host i's batch is the i-th half of the single-host global batch, views included.
    for step in range(3):
        merged = jax.tree.map(lambda a, b: np.concatenate([a, b]), hosts[0][step],
                              hosts[1][step])
        _assert_same(merged, one[step])


def test_drop_remainder_per_epoch(examples):
    ds = ip.probe_train_dataset(examples, batch_size=20, seed=0, image_size=8, num_steps=4,
                                local_device_count=1)
    labels = [b["label"].ravel() for b in _batches(ds)]
    assert ip.steps_per_epoch(N, 20) == 2
    for epoch in (labels[:2], labels[2:]):
        epoch = np.concatenate(epoch)
        assert len(set(epoch)) == 40  # no repeats within an epoch; 8 examples dropped.


def test_probe_train_shapes(examples):
    ds = ip.probe_train_dataset(examples, batch_size=16, seed=0, image_size=12, num_steps=1)
    batch = _batches(ds)[0]
    devices = jax.local_device_count()
    assert batch["image"].shape == (devices, 16 // devices, 12, 12, 3)
    assert batch["label"].shape == (devices, 16 // devices)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(examples, process_count):
    batches = [_batches(ip.eval_dataset(examples, batch_size=20, image_size=8,
                                        process_index=i, process_count=process_count,
                                        local_device_count=2)) for i in range(process_count)]
    assert all(len(b) == ip.num_eval_steps(N, 20) == 3 for b in batches)
    labels = np.concatenate([b["label"].ravel() for h in batches for b in h])
    mask = np.concatenate([b["mask"].ravel() for h in batches for b in h])
    assert mask.sum() == N
    np.testing.assert_array_equal(np.sort(labels[mask == 1]), np.arange(N))
    assert batches[0][0]["image"].shape == (2, 10 // process_count, 8, 8, 3)


def test_config_errors(examples):
    with pytest.raises(ValueError, match="Bad crop size 4"):
        ip.MultiCropConfig(local_size=4)
    with pytest.raises(ValueError, match=r"scale \(0.5, 0.2\)"):
        ip.MultiCropConfig(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="not divisible"):
        ip.pretrain_dataset(examples, batch_size=10, seed=0, local_device_count=4)
    with pytest.raises(ValueError, match="exceeds"):
        ip.pretrain_dataset(examples, batch_size=64, seed=0, local_device_count=1)


def test_random_resized_crop_full_scale_is_resize():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (20, 20, 3)), tf.uint8)
    crop = ip.random_resized_crop(image, tf.constant([1, 2], tf.int64), 10, (1.0, 1.0))
    expected = tf.image.resize(tf.cast(image, tf.float32) / 255, [10, 10], antialias=True)
    np.testing.assert_allclose(crop, expected, atol=1e-6)


def test_random_resized_crop_area_in_scale():
    """A crop of a coordinate image reveals its box: area within scale * image area."""
    h, w = 40, 60
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = tf.constant(np.stack([yy, xx, np.zeros_like(yy)], -1), tf.uint8)
    for i in range(20):
        crop = ip.random_resized_crop(image, tf.constant([i, 7], tf.int64), 64, (0.2, 0.5))
        crop = crop.numpy() * 255
        box_h = crop[-1, 0, 0] - crop[0, 0, 0] + 1
        box_w = crop[0, -1, 1] - crop[0, 0, 1] + 1
        assert 0.2 * h * w * 0.8 < box_h * box_w < 0.5 * h * w * 1.2
        assert 3 / 4 * 0.8 < box_w / box_h < 4 / 3 * 1.2


def test_blur_sigma_in_pixels_or_relative_to_the_crop(examples):
    assert CROPS.blur_sigma(8) == CROPS.blur_sigma(224) == ip.BLUR_SIGMA
    relative = ip.MultiCropConfig(global_size=16, n_global=2, local_size=8, n_local=2,
                                  blur_relative=True)
    assert relative.blur_sigma(224) == pytest.approx(ip.BLUR_SIGMA)
    assert relative.blur_sigma(64) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
    pixels, scaled = _pretrain(examples, num_steps=1), _pretrain(examples, num_steps=1,
                                                                 crops=relative)
    assert [v.shape for v in pixels[0]["views"]] == [v.shape for v in scaled[0]["views"]]
    # Same crops, colours and flips; only the blurred views (p = 0.5) differ.
    differs = [np.abs(a - b).max(axis=(2, 3, 4)) > 1e-6
               for a, b in zip(pixels[0]["views"], scaled[0]["views"])]
    assert 0.2 < np.mean(differs) < 0.8


def test_grayscale_probability():
    """About 20% of views are grayscale (equal channels), as RandomGrayscale(p=0.2)."""
    image = tf.constant(np.random.default_rng(2).integers(0, 256, (12, 12, 3)), tf.uint8)
    views = tf.data.Dataset.range(500).map(
        lambda i: ip.simsiam_augment(image, tf.stack([i, i]), 8, (0.5, 1.0)))
    views = np.stack(list(views.as_numpy_iterator())) * ip.STDDEV_RGB + ip.MEAN_RGB
    gray = np.all(np.abs(views - views[..., :1]) < 1e-4, axis=(1, 2, 3))
    assert 0.15 < gray.mean() < 0.25


def test_colour_ops():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.uniform(size=(12, 12, 3)), tf.float32)
    gray = ip.to_grayscale(image).numpy()
    np.testing.assert_allclose(gray[..., 0], image.numpy() @ [0.2989, 0.587, 0.114], atol=1e-5)
    jittered = ip.color_jitter(image, tf.constant([0, 1], tf.int64)).numpy()
    assert 0 <= jittered.min() and jittered.max() <= 1
    assert not np.allclose(jittered, image)
    # Blur keeps constants, barely changes an image at tiny sigma, smooths at large sigma.
    flat = tf.fill([12, 12, 3], 0.3)
    np.testing.assert_allclose(ip.gaussian_blur(flat, tf.constant(2.0)), flat, atol=1e-6)
    np.testing.assert_allclose(ip.gaussian_blur(image, tf.constant(0.1)), image, atol=1e-6)
    assert ip.gaussian_blur(image, tf.constant(2.0)).numpy().std() < 0.5 * image.numpy().std()


def test_center_crop_geometry():
    yy, xx = np.meshgrid(np.arange(64), np.arange(128), indexing="ij")
    image = tf.constant(np.stack([yy * 4, xx * 2, np.zeros_like(yy)], -1), tf.uint8)
    crop = ip.center_crop(image, 56).numpy() * 255  # resize to 64x128, crop the centre
    assert crop.shape == (56, 56, 3)
    np.testing.assert_allclose(crop[0, 0, :2], [4 * 4, 36 * 2], atol=2)
