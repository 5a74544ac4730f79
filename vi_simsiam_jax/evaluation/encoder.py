"""The frozen encoder of a pretraining run: restored from its checkpoint (or at its initial
weights), and its features extracted over an input pipeline (paper Sec. 6.2: backbone features,
BatchNorm in inference mode)."""

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from orbax.checkpoint import checkpoint_manager as ocp_manager

from vi_simsiam_jax import (checkpoints, datasets, input_pipeline, models, run_config,
                            train_state)

Array = jax.Array
Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Frozen-encoder outputs, one row per image (or augmented view of one)."""

    features: np.ndarray  # (N, D) float32 pooled backbone features
    labels: np.ndarray  # (N,) int32
    index: np.ndarray  # (N,) int32 position of the image in its split's Examples
    kappa: np.ndarray | None = None  # (N,) concentration of a kappa model; None without one

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray) -> "FeatureSet":
        return FeatureSet(self.features[keep], self.labels[keep], self.index[keep],
                          None if self.kappa is None else self.kappa[keep])


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/backbone/conv1/kernel': shape, ...} of a tree of arrays or array metadata."""
    return {"/".join(str(getattr(key, "key", key)) for key in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_architecture(saved: Any, expected: Any, checkpoint: str, config_path: str) -> None:
    """Raises ValueError naming the parameters whose presence or shape differ between the trees."""
    saved, expected = _shapes(saved), _shapes(expected)
    differences = [f"{name}: checkpoint {saved.get(name, 'missing')}, config "
                   f"{expected.get(name, 'missing')}"
                   for name in sorted(saved.keys() | expected.keys())
                   if saved.get(name) != expected.get(name)]
    if differences:
        shown = "; ".join(differences[:6])
        more = f"; and {len(differences) - 6} more" if len(differences) > 6 else ""
        raise ValueError(
            f"Checkpoint {checkpoint} holds another architecture than {config_path} describes "
            f"({len(differences)} parameters differ: {shown}{more}). Probe the workdir the "
            "checkpoint was trained in, with its own config.json.")


def restore_encoder(workdir: str, config: ml_collections.ConfigDict, model: models.SiameseNet,
                    step: int | None = None) -> tuple[Variables, int]:
    """The pretrained {"params", "batch_stats"} at `step` (default: newest readable) and its step.

    Only those two fields of the saved train state are read (no optimiser is built or
    restored). Before restoring, the checkpoint's parameter shapes are compared with `model`
    (built from the workdir's config.json), so a mismatch names the differing parameters.
    """
    manager = checkpoints.manager(workdir, read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoints in {manager.directory}: pretrain first, or pass --random_init "
                "to probe the untrained encoder.")
        abstract = train_state.abstract_variables(config, model)
        checked = max(steps) if step is None else step
        if checked in steps:
            path = manager.directory / str(checked) / ocp_manager.DEFAULT_ITEM_NAME
            saved = ocp.StandardCheckpointer().metadata(path).item_metadata
            check_architecture({"params": saved.get("params", {})},
                               {"params": abstract["params"]}, str(path),
                               os.path.join(workdir, run_config.CONFIG_FILE))
        restored = checkpoints.restore_latest(
            manager, {**abstract, "step": jax.ShapeDtypeStruct((), jnp.int32)}, step,
            partial=True)
    finally:
        manager.close()
    return {"params": restored["params"], "batch_stats": restored["batch_stats"]}, int(
        restored["step"])


def init_encoder(config: ml_collections.ConfigDict, model: models.SiameseNet) -> Variables:
    """The untrained encoder: exactly the pretraining run's initial weights (config.seed)."""
    return train_state.init_variables(jax.random.key(config.seed), config, model)


@functools.partial(jax.jit, static_argnames="model")
def encode(model: models.SiameseNet, variables: Variables, images: Array) -> dict[str, Array]:
    """Inference-mode forward pass of images [..., H, W, 3]: backbone features and, if the model
    predicts one (model.kappa, e.g. VI-SimSiam), kappa (else None), flattened over the leading
    (device, batch) axes."""
    images = images.reshape((-1,) + images.shape[-3:])
    out = model.apply(variables, images, False, predict=model.kappa)
    return {"features": out.features.astype(jnp.float32), "kappa": out.kappa}


def _shardings() -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
    """(batches [local devices, per device, ...] split over this host's devices, replicated)."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def extract_features(model: models.SiameseNet, variables: Variables,
                     batches: tf.data.Dataset) -> FeatureSet:
    """Runs the frozen encoder over an input_pipeline dataset; padding rows (mask 0) dropped.

    One batch stays in flight while the next is fetched, so input and compute overlap.
    """
    start = time.perf_counter()
    data, replicated = _shardings()
    variables = jax.device_put(variables, replicated)
    rows: dict[str, list[np.ndarray]] = {"features": [], "kappa": [], "labels": [], "index": []}

    def collect(out: dict[str, Array], batch: dict[str, np.ndarray]) -> None:
        out = jax.device_get(out)
        keep = batch["mask"].reshape(-1) > 0 if "mask" in batch else slice(None)
        rows["features"].append(out["features"][keep])
        if out["kappa"] is not None:
            rows["kappa"].append(out["kappa"][keep])
        rows["labels"].append(batch["label"].reshape(-1)[keep])
        rows["index"].append(batch["index"].reshape(-1)[keep])

    pending = None
    for batch in batches.as_numpy_iterator():
        out = encode(model, variables, jax.device_put(batch["image"], data))
        if pending is not None:
            collect(*pending)
        pending = out, batch
    if pending is None:
        raise ValueError("The dataset to extract features from is empty.")
    collect(*pending)
    features = FeatureSet(np.concatenate(rows["features"]), np.concatenate(rows["labels"]),
                          np.concatenate(rows["index"]),
                          np.concatenate(rows["kappa"]) if rows["kappa"] else None)
    seconds = time.perf_counter() - start
    logging.info("Extracted %d feature rows in %.1f s (%.1f images/s).", len(features), seconds,
                 len(features) / seconds)
    return features


def stream_features(model: models.SiameseNet, variables: Variables, batches: tf.data.Dataset
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of each batch of an input_pipeline dataset, computed as it arrives."""
    data, replicated = _shardings()
    variables = jax.device_put(variables, replicated)
    for batch in batches.as_numpy_iterator():
        out = encode(model, variables, jax.device_put(batch["image"], data))
        yield jax.device_get(out["features"]), batch["label"].reshape(-1)


def single_host(**kwargs: Any) -> dict[str, Any]:
    """Input pipeline arguments by which every host reads the whole split (probing is cheap next
    to pretraining)."""
    return dict(process_index=0, process_count=1, **kwargs)


def centre_crop_features(model: models.SiameseNet, variables: Variables,
                         examples: datasets.Examples, batch_size: int, image_size: int,
                         corruption: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None
                         ) -> FeatureSet:
    """Features of the resize + centre crop of every example, in order; `corruption` as in
    input_pipeline.eval_dataset."""
    dataset = input_pipeline.eval_dataset(
        examples, **single_host(batch_size=batch_size, image_size=image_size,
                                corruption=corruption))
    return extract_features(model, variables, dataset)


def augmented_features(model: models.SiameseNet, variables: Variables,
                       examples: datasets.Examples, config: ml_collections.ConfigDict,
                       image_size: int) -> FeatureSet:
    """Features of config.train_views epochs of random-resized-crop + flip views."""
    batch_size = config.extract_batch_size
    num_steps = config.train_views * input_pipeline.steps_per_epoch(len(examples), batch_size)
    dataset = input_pipeline.probe_train_dataset(
        examples, **single_host(batch_size=batch_size, seed=config.seed, image_size=image_size,
                                scale=tuple(config.crop_scale), num_steps=num_steps))
    return extract_features(model, variables, dataset)


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
    """A pretraining run's encoder as evaluation uses it: its config, model and variables."""

    config: ml_collections.ConfigDict  # the pretraining config (the workdir's config.json)
    model: models.SiameseNet
    variables: Variables  # {"params", "batch_stats"}
    step: int  # the checkpoint's step (0 at random init)
    random_init: bool = False

    def features(self, examples: datasets.Examples, batch_size: int, image_size: int,
                 corruption: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None
                 ) -> FeatureSet:
        """`centre_crop_features` of examples with this encoder."""
        return centre_crop_features(self.model, self.variables, examples,
                                    batch_size=batch_size, image_size=image_size,
                                    corruption=corruption)


def load(workdir: str, step: int | None = None, random_init: bool = False,
         half_precision: bool = False) -> FrozenEncoder:
    """The frozen encoder of a pretraining workdir. step: checkpoint step (default: newest);
    random_init: the run's initial weights instead; half_precision: the encoder computes in
    bfloat16 (`train_state.make_model`), whatever the pretraining did; its features are float32
    either way."""
    config = run_config.load_config(workdir)
    model = train_state.make_model(config, axis_name=None, half_precision=half_precision)
    if random_init:
        variables, step = init_encoder(config, model), 0
    else:
        variables, step = restore_encoder(workdir, config, model, step)
    return FrozenEncoder(config, model, variables, step, random_init)


def load_splits(config: ml_collections.ConfigDict
                ) -> tuple[datasets.Examples, datasets.Examples]:
    """The train and val examples of a pretraining config's dataset."""
    builder = datasets.prepare_from_config(config)
    return datasets.load_examples(builder, "train"), datasets.load_examples(builder, "val")
