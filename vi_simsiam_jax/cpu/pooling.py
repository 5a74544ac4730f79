"""Max pooling for XLA:CPU with a cheap gradient: a drop-in for nn.max_pool.

nn.max_pool's gradient (reduce_window max) compiles on XLA:CPU to a variadic reduce-window that
carries four int32 index arrays of the padded input, and a scatter (its cost in the step:
benchmarks/README.md, "Max pooling").
Here the forward takes the max over the window's strided slices and keeps the (int8) index of
the first maximal tap in row-major order (the tap that select-and-scatter and torch route the
gradient to); the backward adds, per tap, the gradients of the outputs whose maximum it was, as
interior-padded (strided) arrays that XLA fuses into one loop.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vi_simsiam_jax.cpu import conv

Array = jax.Array
Padding = conv.Padding


def _window_slices(xp: Array, window, strides, out_hw):
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    b, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            yield (i, j), lax.slice(xp, (0, i, j, 0),
                                    (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                                    (1, sh, sw, 1))


def _pad_neg_inf(x: Array, padding: Padding) -> Array:
    fill = jnp.array(-jnp.inf if jnp.issubdtype(x.dtype, jnp.floating)
                     else jnp.iinfo(x.dtype).min, x.dtype)
    return lax.pad(x, fill, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


def _max_pool_with_index(x: Array, window, strides, padding) -> tuple[Array, Array]:
    xp = _pad_neg_inf(x, padding)
    out_hw = conv.output_hw(x.shape[1:3], window, strides, padding)
    index_dtype = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
    best = index = None
    for tap, (_, value) in enumerate(_window_slices(xp, window, strides, out_hw)):
        if best is None:
            best, index = value, jnp.zeros(value.shape, index_dtype)
        else:
            better = value > best  # strict: ties keep the first tap
            best = jnp.maximum(best, value)  # (propagates NaN, as nn.max_pool)
            index = jnp.where(better, jnp.asarray(tap, index_dtype), index)
    return best, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_nhwc(x: Array, window: tuple[int, int], strides: tuple[int, int],
                   padding: Padding) -> Array:
    return _max_pool_with_index(x, window, strides, padding)[0]


def _max_pool_fwd(x, window, strides, padding):
    y, index = _max_pool_with_index(x, window, strides, padding)
    return y, (index, x.shape[1:3])


def _max_pool_bwd(window, strides, padding, residuals, g):
    index, (h, w) = residuals
    (pt, pb), (pl, pr) = padding
    hp, wp = h + pt + pb, w + pl + pr
    (sh, sw), (ho, wo) = strides, g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    dxp = None
    for tap in range(window[0] * window[1]):
        i, j = divmod(tap, window[1])
        term = lax.pad(jnp.where(index == tap, g, zero), zero, (
            (0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1),
            (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
        dxp = term if dxp is None else dxp + term
    return (dxp[:, pt:hp - pb, pl:wp - pr],)


_max_pool_nhwc.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(inputs: Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Any = "VALID") -> Array:
    """nn.max_pool for NHWC inputs (same arguments and values), with the cheap XLA:CPU gradient
    above; other ranks and window shapes go to nn.max_pool."""
    strides = tuple(strides) if strides is not None else (1,) * len(window_shape)
    if inputs.ndim != 4 or len(window_shape) != 2:
        return nn.max_pool(inputs, tuple(window_shape), strides, padding)
    pads = conv.explicit_padding(padding, inputs.shape[1:3], window_shape, strides)
    return _max_pool_nhwc(inputs, tuple(window_shape), strides, pads)
