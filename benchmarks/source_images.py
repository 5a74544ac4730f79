"""Memory and crop-and-resize FLOPs of the pretraining source images in memory, before and after
every image was fitted into stream_max_side x stream_max_side (input_pipeline._fit).

    .venv/bin/python -m benchmarks.source_images --datasets=imagewoof,imagenette
    .venv/bin/python -m benchmarks.source_images --datasets=imagenette \
        --config=experiments/configs/cpu_demo.py

One JSON line per dataset, from its prepared train split's JPEG headers (nothing is decoded) and
the views, batch size and stream_max_side of --config (default: the paper's,
experiments/configs/paper.py): "before" is the old layout (every image
at full size on a canvas of the split's largest height x largest width), "after" the fitted one
(each image fitted, the canvas the split's largest fitted height x width: input_pipeline.canvas). A view of side s made from an H x W canvas costs two matrix products
(augment.crop_and_resize), jnp.einsum contracting the cheaper side first:
    flops(s, H, W) = 2 * 3 * s * (H * W + s * min(H, W)).
`own_size_gflop_per_step` is that cost with each image at its own size (no canvas, the mean over
the split), which `relative_flops` divides by; `xla_over_formula` is XLA's cost analysis of
crop_and_resize over the formula, for each canvas and view size.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vi_simsiam_jax import augment, datasets
from vi_simsiam_jax import input_pipeline as ip

_DATASETS = flags.DEFINE_list("datasets", ["imagewoof"], "Datasets (prepared, or archives).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir (default: tfds's).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "paper.py"),
    "Pretraining config: its views, batch size and stream_max_side (not its dataset).")


def crop_and_resize_flops(size: int, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """FLOPs of one view of side `size` from a height x width canvas (module docstring)."""
    height, width = np.asarray(height, np.float64), np.asarray(width, np.float64)
    return 2 * 3 * size * (height * width + size * np.minimum(height, width))


def xla_flops(size: int, height: int, width: int) -> float:
    """XLA's cost analysis of augment.crop_and_resize on one float32 canvas."""
    compiled = jax.jit(lambda image, box: augment.crop_and_resize(image, box, size)).lower(
        jax.ShapeDtypeStruct((height, width, 3), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def measure(dataset: str) -> dict:
    config = _CONFIG.value
    builder = datasets.prepare(dataset, data_dir=_DATA_DIR.value, download=False)
    sizes = ip.jpeg_sizes(datasets.load_examples(builder, "train"))
    view_sizes = ([config.global_size] * config.global_crops
                  + [config.local_size] * config.local_crops)
    side = config.stream_max_side

    def per_step(height, width) -> float:  # GFLOP of one step's views, mean image
        return config.batch_size * sum(
            float(np.mean(crop_and_resize_flops(s, height, width))) for s in view_sizes) / 1e9

    own = per_step(sizes[:, 0], sizes[:, 1])
    canvases = {"before": tuple(int(x) for x in sizes.max(axis=0)),
                "after": tuple(int(x) for x in ip.fitted_sizes(sizes, side).max(axis=0))}
    result = {"dataset": dataset, "images": len(sizes), "stream_max_side": side,
              "batch_size": config.batch_size, "view_sizes": view_sizes,
              "mean_image_area": float(np.mean(sizes[:, 0] * sizes[:, 1])),
              "images_over_max_side": int(np.sum(sizes.max(axis=1) > side)),
              "own_size_gflop_per_step": own}
    for name, (height, width) in canvases.items():
        gflop = per_step(height, width)
        result[name] = {
            "canvas": [height, width], "bytes": len(sizes) * height * width * 3,
            "canvas_over_mean_area": height * width / result["mean_image_area"],
            "gflop_per_step": gflop, "relative_flops": gflop / own,
            "xla_over_formula": {s: xla_flops(s, height, width)
                                 / float(crop_and_resize_flops(s, height, width))
                                 for s in sorted(set(view_sizes))}}
    return result


def main(argv):
    del argv
    for dataset in _DATASETS.value:
        print(json.dumps(measure(dataset)), flush=True)


if __name__ == "__main__":
    app.run(main)
