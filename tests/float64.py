"""Float64 copies of a model and of arrays (use inside `jax.enable_x64(True)`); a float64
model's `train_state.create_train_state` is float64 too.

Tests that compare two differently compiled programs of the same math (8 devices vs 1, a model
with or without its device axis, grouped vs sequential BatchNorm passes, our step vs PyTorch's)
run them in float64: their claim is about the math, and in float32 the roundoff of the terms that
cancel (Power Spherical log-densities hundreds of times the loss, BatchNorm over a few examples)
would set the tolerance, and differ with each CPU's code generation.
"""

import jax
import jax.numpy as jnp

from vi_simsiam_jax import models


def model(net: models.SiameseNet) -> models.SiameseNet:
    return net.clone(dtype=jnp.float64)


def tree(values):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), values)
