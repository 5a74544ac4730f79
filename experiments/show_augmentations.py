r"""Writes a PNG grid: for a few images, the centre crop then each multi-crop view of a config.

  python -m experiments.show_augmentations --config=experiments/configs/cpu_demo.py \
      --out=runs/augmentations.png

Views come from `augment.views` with the config's crops (`train_state.crops_config`), the
function and views the pretraining step runs, undone from the ImageNet normalisation; the first
column is the eval centre crop of the same image. The dataset is the config's.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vi_simsiam_jax import augment, datasets, train_state  # noqa: E402
from vi_simsiam_jax import input_pipeline as ip  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "cpu_demo.py"),
    "Pretraining config: its dataset and crops.", lock_config=True)
_OUT = flags.DEFINE_string("out", "runs/augmentations.png", "PNG to write.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images (rows) to show.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the image choice and the views.")


def _unnormalize(image: np.ndarray) -> np.ndarray:
    return np.clip(image * np.array(augment.STDDEV_RGB) + np.array(augment.MEAN_RGB), 0, 1)


def main(argv):
    del argv
    config = _CONFIG.value
    builder = datasets.prepare_from_config(config)
    examples = datasets.load_examples(builder, "train")
    crops = train_state.crops_config(config)
    indices = np.random.default_rng(_SEED.value).choice(len(examples), _NUM_IMAGES.value,
                                                        replace=False)
    source = ip.decode_images(examples.subset(indices), config.stream_max_side)
    views = augment.views(source.images, source.sizes, indices.astype(np.int32),
                          jax.random.key(_SEED.value), crops)
    labels = source.labels
    originals = [ip.center_crop(tf.io.decode_jpeg(examples.images[i], channels=3),
                                config.global_size).numpy() for i in indices]
    columns = [originals] + [_unnormalize(np.asarray(v)) for v in views]
    titles = (["centre crop"] + [f"global {i + 1}" for i in range(crops.n_global)]
              + [f"local {i + 1}" for i in range(crops.n_local)])
    fig, axes = plt.subplots(len(labels), len(columns), squeeze=False,
                             figsize=(1.6 * len(columns), 1.7 * len(labels)))
    for row in range(len(labels)):
        for col, images in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(images[row])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{titles[col]} {images[row].shape[0]}px", fontsize=7)
        axes[row, 0].set_ylabel(builder.builder_config.label_descriptions[labels[row]],
                                fontsize=7)
    fig.tight_layout()
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    app.run(main)
