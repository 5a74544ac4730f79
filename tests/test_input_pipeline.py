"""Input streams: decoded and streamed source images (one layout: the same batches, and the same
training losses, from either), determinism, resumption, host sharding; the probe and eval
pipelines."""

import hashlib
import io
import itertools
import json

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests import fake_archives
from tests.pretrain_utils import config
from vi_simsiam_jax import datasets, loop
from vi_simsiam_jax import input_pipeline as ip

N = 48  # examples; label i identifies example i.
MAX_SIDE = 24  # the largest side of `examples`: none is shrunk


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _examples(shapes: list[tuple[int, int]], seed: int = 0) -> datasets.Examples:
    """Random JPEGs of the given (height, width); label i identifies example i."""
    rng = np.random.default_rng(seed)
    n = len(shapes)
    return datasets.Examples(np.array([_jpeg(rng, h, w) for h, w in shapes], dtype=object),
                             np.arange(n, dtype=np.int32),
                             np.array([f"train/c/{i}.JPEG" for i in range(n)], dtype=object),
                             ("c",))


@pytest.fixture(scope="module")
def examples() -> datasets.Examples:
    return _examples([(20 + i % 5, 24 - i % 3) for i in range(N)])


@pytest.fixture(scope="module")
def mixed() -> datasets.Examples:
    """32 images from 9 x 13 to 47 x 31 px: about half have a side over MAX_SIDE."""
    return _examples([(9 + (7 * i) % 39, 13 + (5 * i) % 19) for i in range(32)], seed=1)


@pytest.fixture(scope="module")
def source(examples) -> ip.SourceImages:
    return ip.decode_images(examples, MAX_SIDE)


def _batches(ds: tf.data.Dataset) -> list:
    return list(ds.as_numpy_iterator())


def _pretrain(source, num_steps=4, **kwargs) -> list:
    args = dict(batch_size=16, seed=3, local_device_count=2)
    return list(itertools.islice(ip.pretrain_batches(source, **(args | kwargs)), num_steps))


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(source) -> list:
    """Steps 0..5 (2 epochs of 3 steps) of one host, uninterrupted."""
    return _pretrain(source, num_steps=6)


def test_decoded_images_are_padded_with_their_sizes(examples, source):
    assert source.images.shape == (N, 24, 24, 3) and source.images.dtype == np.uint8
    for i in (0, 7, 13):
        image = tf.io.decode_jpeg(examples.images[i], dct_method="INTEGER_ACCURATE").numpy()
        height, width = source.sizes[i]
        assert (height, width) == image.shape[:2] == (20 + i % 5, 24 - i % 3)
        np.testing.assert_array_equal(source.images[i, :height, :width], image)
        assert not source.images[i, height:].any() and not source.images[i, :, width:].any()


def test_decoded_images_are_cached(examples, source, tmp_path):
    # A cache of the layout before fitting (each image padded to the split's largest height x
    # width), named by the split's hash alone: never read.
    digest = hashlib.sha256("\n".join(examples.file_names).encode()).hexdigest()[:16]
    np.save(tmp_path / f"{digest}-images.npy", np.full((N, 30, 40, 3), 7, np.uint8))
    np.save(tmp_path / f"{digest}-sizes.npy", np.full((N, 2), 30, np.int32))
    first = ip.cached_images(examples, str(tmp_path), MAX_SIDE)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 4 and all(f.endswith(".npy") for f in files)
    second = ip.cached_images(examples, str(tmp_path), MAX_SIDE)  # read back, not decoded again
    assert isinstance(second.images, np.memmap)
    for decoded in (first, second):
        np.testing.assert_array_equal(decoded.images, source.images)
        np.testing.assert_array_equal(decoded.sizes, source.sizes)
    ip.cached_images(examples.subset(np.arange(N) < 10), str(tmp_path), MAX_SIDE)  # another split
    assert len(list(tmp_path.iterdir())) == 6
    smaller = ip.cached_images(examples, str(tmp_path), 12)  # another max_side
    assert len(list(tmp_path.iterdir())) == 8 and smaller.images.shape == (N, 12, 12, 3)


def test_canvas_is_the_largest_fitted_size_and_images_keep_their_place(mixed):
    """Every image is held at most MAX_SIDE on a side, at the top-left of the split's canvas:
    its largest fitted height and width (at most MAX_SIDE x MAX_SIDE, from the JPEG headers
    alone); larger images in the split change nothing of the others but their padding."""
    sizes = np.array([(9 + (7 * i) % 39, 13 + (5 * i) % 19) for i in range(len(mixed))])
    small = sizes.max(axis=1) <= MAX_SIDE
    assert 0 < small.sum() < len(mixed)
    alone = ip.decode_images(mixed.subset(small), MAX_SIDE)
    together = ip.decode_images(mixed, MAX_SIDE)
    assert together.images.shape[1:] == (MAX_SIDE, MAX_SIDE, 3)
    assert alone.images.shape[1:] == (*sizes[small].max(axis=0), 3)  # nothing shrunk
    height, width = alone.images.shape[1:3]
    np.testing.assert_array_equal(together.images[small][:, :height, :width], alone.images)
    np.testing.assert_array_equal(together.sizes[small], sizes[small])  # not shrunk
    # Larger images scaled by MAX_SIDE / their longer side, each side rounded to a pixel.
    scaled = sizes[~small] * (MAX_SIDE / sizes[~small].max(axis=1, keepdims=True))
    np.testing.assert_array_equal(together.sizes[~small], np.round(scaled))
    np.testing.assert_array_equal(ip.fitted_sizes(sizes, MAX_SIDE), together.sizes)
    for image, (height, width) in zip(together.images, together.sizes):
        assert not image[height:].any() and not image[:, width:].any()


def test_pretrain_batches_shapes_and_values(source, reference):
    assert len(reference) == 6
    batch = reference[0]
    assert batch["image"].shape == (2, 8, 24, 24, 3) and batch["image"].dtype == np.uint8
    assert batch["size"].shape == (2, 8, 2) and batch["position"].shape == (2, 8)
    np.testing.assert_array_equal(batch["position"].ravel(), np.arange(16))
    index = batch["index"].ravel()
    np.testing.assert_array_equal(batch["image"].reshape(16, 24, 24, 3), source.images[index])
    np.testing.assert_array_equal(batch["label"].ravel(), index)  # label i is example i
    np.testing.assert_array_equal(reference[1]["position"].ravel(), np.arange(16, 32))


def test_same_seed_same_batches_other_seed_differs(source, reference):
    _assert_same(_pretrain(source), reference[:4])
    other = _pretrain(source, seed=4)
    assert not np.array_equal(other[0]["index"], reference[0]["index"])


def test_start_at_step_k_matches_uninterrupted(source, reference):
    _assert_same(_pretrain(source, start_step=2), reference[2:])


def test_epochs_are_permutations(reference):
    assert ip.steps_per_epoch(N, 16) == 3
    epochs = [np.concatenate([b["index"].ravel() for b in reference[e * 3:(e + 1) * 3]])
              for e in range(2)]
    for indices in epochs:
        np.testing.assert_array_equal(np.sort(indices), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1])


def test_two_hosts_disjoint_and_equal_to_one_host(source, reference):
    hosts = [_pretrain(source, num_steps=3, local_device_count=1, process_count=2,
                       process_index=i) for i in range(2)]
    indices = [np.concatenate([b["index"].ravel() for b in h]) for h in hosts]
    assert not set(indices[0]) & set(indices[1])
    assert set(indices[0]) | set(indices[1]) == set(range(N))
    # Host i's batch is the i-th half of the single-host global batch.
    for step in range(3):
        merged = jax.tree.map(lambda a, b: np.concatenate([a, b]), hosts[0][step],
                              hosts[1][step])
        _assert_same(merged, reference[step])


def test_streamed_batches_equal_in_memory_ones(examples, source, reference):
    streamed = _pretrain(ip.StreamedImages(examples, MAX_SIDE), num_steps=6)
    _assert_same(streamed, reference)
    resumed = _pretrain(ip.StreamedImages(examples, MAX_SIDE), start_step=2, num_steps=2)
    _assert_same(resumed, reference[2:4])


def test_mixed_sizes_streamed_equal_in_memory_bit_for_bit(mixed):
    """On images smaller and larger than max_side, the streamed batches are the in-memory ones
    (images, sizes, positions, labels), so the step makes the same views from either."""
    in_memory = _pretrain(ip.decode_images(mixed, MAX_SIDE), num_steps=3)
    _assert_same(_pretrain(ip.StreamedImages(mixed, MAX_SIDE), num_steps=3), in_memory)
    sizes = np.concatenate([b["size"].reshape(-1, 2) for b in in_memory])
    assert (sizes.max(axis=1) == MAX_SIDE).any() and (sizes.max(axis=1) < MAX_SIDE).any()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[str, str]:
    """A prepared folder dataset of 18 training images: 12 x 16, 20 x 24 and 40 x 44 px (the
    last over the cap of `test_memory_and_stream_train_alike`)."""
    root = tmp_path_factory.mktemp("mixed_sizes")
    for seed, (name, size) in enumerate((("a", 12), ("b", 20), ("c", 40))):
        fake_archives.make_folder(root / "images", [name], n_train=6, n_val=1, size=size,
                                  extras=False, seed=seed)
    datasets.prepare(str(root / "images"), data_dir=str(root / "tfds"))
    return str(root / "images"), str(root / "tfds")


def test_memory_and_stream_train_alike(mixed_folder, tmp_path):
    """`loop.pretrain` for 2 steps with the same seed, source images in memory and streamed:
    the same losses and the same trained parameters, bit for bit."""
    runs = {}
    for source in ("memory", "stream"):
        state = loop.pretrain(config(mixed_folder, source_images=source, stream_max_side=32,
                                     num_epochs=1, log_every_steps=1),
                              str(tmp_path / source))
        records = [json.loads(line) for line in
                   (tmp_path / source / "metrics.jsonl").read_text().splitlines()]
        runs[source] = ([(r["step"], r["loss"]) for r in records],
                        jax.device_get((state.step, state.params, state.batch_stats)))
    assert [step for step, _ in runs["memory"][0]] == [1, 2]
    _assert_same(runs["memory"], runs["stream"])


def test_streamed_images_are_shrunk_to_fit(examples):
    (batch,) = _pretrain(ip.StreamedImages(examples, max_side=12), num_steps=1,
                         local_device_count=1)
    assert batch["image"].shape == (1, 16, 12, 12, 3)
    sizes = batch["size"][0]
    originals = np.array([(20 + i % 5, 24 - i % 3) for i in batch["index"][0]])
    assert np.all(sizes.max(axis=1) == 12)  # the longer side fits exactly, the ratio is kept
    np.testing.assert_allclose(sizes[:, 0] / sizes[:, 1], originals[:, 0] / originals[:, 1],
                               atol=0.1)


def test_pretrain_source_picks_memory_unless_too_large(examples, tmp_path, monkeypatch):
    in_memory = ip.pretrain_source(examples, cache_dir=str(tmp_path), stream_max_side=32)
    # The canvas: the largest height and width of `examples`, none over 32.
    assert isinstance(in_memory, ip.SourceImages) and in_memory.images.shape == (N, 24, 24, 3)
    monkeypatch.setattr(ip, "MEMORY_FRACTION", 0.0)
    streamed = ip.pretrain_source(examples, cache_dir=str(tmp_path), stream_max_side=32)
    assert isinstance(streamed, ip.StreamedImages) and streamed.max_side == 32
    assert isinstance(ip.pretrain_source(examples, "memory", cache_dir=str(tmp_path),
                                         stream_max_side=32), ip.SourceImages)
    with pytest.raises(ValueError, match="Unknown image source 'disk'"):
        ip.pretrain_source(examples, "disk", cache_dir=str(tmp_path))


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


def test_config_errors(source):
    with pytest.raises(ValueError, match="not divisible"):
        next(ip.pretrain_batches(source, batch_size=10, seed=0, local_device_count=4))
    with pytest.raises(ValueError, match="exceeds"):
        next(ip.pretrain_batches(source, batch_size=64, seed=0, local_device_count=1))


def test_random_resized_crop_full_scale_is_resize():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (20, 20, 3)), tf.uint8)
    crop = ip.random_resized_crop(image, tf.constant([1, 2], tf.int64), 10, (1.0, 1.0))
    expected = tf.image.resize(tf.cast(image, tf.float32) / 255, [10, 10], antialias=True)
    np.testing.assert_allclose(crop, expected, atol=1e-6)


def test_center_crop_geometry():
    yy, xx = np.meshgrid(np.arange(64), np.arange(128), indexing="ij")
    image = tf.constant(np.stack([yy * 4, xx * 2, np.zeros_like(yy)], -1), tf.uint8)
    crop = ip.center_crop(image, 56).numpy() * 255  # resize to 64x128, crop the centre
    assert crop.shape == (56, 56, 3)
    np.testing.assert_allclose(crop[0, 0, :2], [4 * 4, 36 * 2], atol=2)
