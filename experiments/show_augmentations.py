r"""Writes a PNG grid: for a few images, the centre crop then each multi-crop view.

  python -m experiments.show_augmentations --dataset=imagenette --out=runs/augmentations.png

Views come from `augment.views`, the function the pretraining step runs, undone from the
ImageNet normalisation; the first column is the eval centre crop of the same image.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from vi_simsiam_jax import augment, datasets  # noqa: E402
from vi_simsiam_jax import input_pipeline as ip  # noqa: E402

_DATASET = flags.DEFINE_string("dataset", "imagenette", "Dataset name or folder path.")
_ARCHIVE = flags.DEFINE_string("archive", None, "Local fast.ai archive (.tgz) or folder.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: tfds's).")
_OUT = flags.DEFINE_string("out", "runs/augmentations.png", "PNG to write.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images (rows) to show.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the image choice and the views.")
_GLOBAL_SIZE = flags.DEFINE_integer("global_size", 224, "Global crop size.")
_N_LOCAL = flags.DEFINE_integer("n_local", 6, "Number of local crops.")
_LOCAL_SIZE = flags.DEFINE_integer("local_size", 96, "Local crop size.")


def _unnormalize(image: np.ndarray) -> np.ndarray:
    return np.clip(image * np.array(augment.STDDEV_RGB) + np.array(augment.MEAN_RGB), 0, 1)


def main(argv):
    del argv
    builder = datasets.prepare(_DATASET.value, data_dir=_DATA_DIR.value, archive=_ARCHIVE.value)
    examples = datasets.load_examples(builder, "train")
    crops = augment.MultiCropConfig(global_size=_GLOBAL_SIZE.value, n_local=_N_LOCAL.value,
                                    local_size=_LOCAL_SIZE.value)
    indices = np.random.default_rng(_SEED.value).choice(len(examples), _NUM_IMAGES.value,
                                                        replace=False)
    source = ip.decode_images(examples.subset(indices))
    views = augment.views(source.images, source.sizes, indices.astype(np.int32),
                          jax.random.key(_SEED.value), crops)
    labels = source.labels
    originals = [ip.center_crop(tf.io.decode_jpeg(examples.images[i], channels=3),
                                _GLOBAL_SIZE.value).numpy() for i in indices]
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
