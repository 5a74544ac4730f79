"""Image corruptions at five severities, after ImageNet-C (Hendrycks & Dietterich, ICLR 2019).

Four of ImageNet-C's corruptions (Gaussian blur is one of its held-out extras), with its
parameters for severities 1-5 (`PARAMETERS`, from its `make_imagenet_c.py`):
- gaussian_noise: x + N(0, c^2) per pixel and channel, c = 0.08 ... 0.38 on [0, 1] images;
- gaussian_blur: Gaussian of standard deviation c = 1 ... 6 pixels of a 224 px image, scaled to
  the image evaluated (c * size / 224, so a 64 px crop is blurred as much relative to its
  content as ImageNet-C's 224 px one); kernel truncated at 4 sigma (scikit-image's default) with
  reflect padding (ImageNet-C's scikit-image call pads by edge replication);
- jpeg_compression: JPEG re-encoding at quality c = 25 ... 7 (tf.image.adjust_jpeg_quality);
- contrast: (x - m) * c + m with m the per-channel mean of the image, c = 0.4 ... 0.05.
Each maps the [0, 1] float centre crop the encoder sees (input_pipeline.eval_dataset's
`corruption` hook) to a [0, 1] image; severity 0 is the identity. Noise is drawn from the
stateless seed the pipeline derives from the image's position, so a pass is reproducible.
"""

import functools
import math
from collections.abc import Callable

import tensorflow as tf

import numpy as np

from vi_simsiam_jax import augment

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg_compression", "contrast")
SEVERITIES = (1, 2, 3, 4, 5)
PARAMETERS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std on [0, 1]
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),  # sigma in pixels of a 224 px image
    "jpeg_compression": (25, 18, 15, 10, 7),  # JPEG quality
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor on the deviation from the mean
}
IMAGENET_C_SIZE = 224  # the crop size ImageNet-C's pixel parameters refer to
BLUR_TRUNCATE = 4.0  # kernel half-width in sigmas


def check(name: str, severity: int) -> None:
    """Raises ValueError unless `name` is one of CORRUPTIONS and 0 <= severity <= 5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}: use one of {CORRUPTIONS}.")
    if severity != 0 and severity not in SEVERITIES:
        raise ValueError(f"Corruption severity must be 0 (none) or one of {SEVERITIES}, got "
                         f"{severity}.")


def corrupt(image: tf.Tensor, rng: tf.Tensor, name: str, severity: int) -> tf.Tensor:
    """`image` [size, size, 3] in [0, 1] under corruption `name` at `severity` (0: unchanged).

    rng: a stateless seed (shape [2]), used by gaussian_noise only.
    """
    check(name, severity)
    if severity == 0:
        return image
    c = PARAMETERS[name][severity - 1]
    shape = image.shape
    if name == "gaussian_noise":
        image = image + c * tf.random.stateless_normal(tf.shape(image), rng)
    elif name == "gaussian_blur":
        size = image.shape[0]
        sigma = c * size / IMAGENET_C_SIZE
        radius = min(math.ceil(BLUR_TRUNCATE * sigma), size - 1)
        # The augmentation's separable blur (reflect padding); sigma is fixed, so is the matrix.
        blur = tf.constant(np.asarray(augment.blur_matrix(sigma, size, radius)))
        image = tf.einsum("oh,hwc,pw->opc", blur, image, blur)
    elif name == "jpeg_compression":
        image = tf.image.adjust_jpeg_quality(image, c)
    else:
        mean = tf.reduce_mean(image, axis=(0, 1), keepdims=True)
        image = (image - mean) * c + mean
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), shape)  # JPEG loses it


def corruption(name: str, severity: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """corrupt() with its name and severity bound: the eval pipeline's `corruption` argument."""
    check(name, severity)
    return functools.partial(corrupt, name=name, severity=severity)
