"""Convolutions for XLA:CPU: a drop-in `nn.Conv` whose 2-D convolutions run each piece (forward,
input gradient, weight gradient) in the formulation XLA:CPU runs fastest for the layer's shape.
The module is nn.Conv itself (with its `conv_general_dilated` hook set), so parameter names,
shapes, initialisers and auto-names are nn.Conv's: checkpoints do not depend on the backend.

    conv = CpuConv                 # an nn.Conv whose convolutions run the plans below
    conv(64, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), use_bias=False)

What XLA:CPU (jaxlib 0.10.2) does slowly in the ResNet-18 training step, with the XLA flags of
`cpu.process` (convolutions in XLA's multi-threaded Eigen convolution, not single-threaded
YNNPACK), and the plan that replaces it (the timings behind each choice: benchmarks/README.md,
"How the CPU backend gets its speed"):
* A 3x3 convolution whose input is smaller than its window (the 2x2 maps of the last stage at
  64 px): the algebraic simplifier swaps its operands into a convolution that runs far below
  the machine's matmul speed -> every piece "dense": one matmul with the (H W Cin, Ho Wo Cout)
  matrix of the convolution, 44% of im2col's FLOPs on a 2x2 map (im2col multiplies the zero
  padding).
* Strided input gradients, which XLA runs as a slow lhs-dilated convolution -> "phases": split
  into stride^2 phases of the input, each a small stride-1 native convolution of the output
  gradient; "im2col" where the output has <= 16 pixels.
* 3x3 stride-1 layers (most of ResNet-18's arithmetic) on even sides -> "winograd" for the
  forward and the input gradient (Winograd F(2x2, 3x3): 16 matmuls over 2x2 output tiles, 44%
  of the direct method's multiplications), and for the weight gradient from 128 input channels
  on (below that its transforms cost more than they save). On inputs of 16 MB and more, one
  chunk of ~2 MB of images at a time (a `lax.fori_loop`): the 16 transformed copies of the
  input otherwise go through memory instead of cache.
* Other weight gradients -> "chunked": a `lax.fori_loop` over chunks of ~2k output pixels, an
  im2col that stays in cache and one matmul (YNNPACK); XLA's weight gradients match it layer by
  layer but make the whole step slower. 1x1 shortcuts: "im2col" (a strided slice and one
  matmul); the 7x7 stem: "native" (XLA's: its im2col rows would be mostly copying).
* Stride-1 layers on small maps that Winograd does not take (odd sides: 3x3 maps at 96 px, 5x5
  at 160 px) -> "taps": one matmul per kernel tap over the pixels it reaches, so no products
  with the zero padding (XLA's convolution multiplies it: 81 (tap, pixel) pairs per 3x3 map
  instead of 49). Up to TAPS_MAX_PIXELS pixels: the larger the map, the smaller the share of
  padding products it skips.
Per-piece times: `python -m benchmarks.resnet_layers --image_size=64 --stem=imagenet`.
Everything else (the stems, strided forwards, larger odd sides) is XLA's native convolution.

`choose` makes the plan per layer; every other convolution (dilated, grouped, not NHWC/HWIO) is
lax.conv_general_dilated. GPU/TPU keep XLA's native convolutions (`vi_simsiam_jax.backends`).
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]

POLICIES = ("auto", "native", "im2col")

_DN = ("NHWC", "HWIO", "NHWC")

# auto policy: strided input gradients by im2col when the output has at most this many pixels.
IM2COL_MAX_OUTPUT_PIXELS = 16
# auto policy: Winograd for 3x3 stride-1 layers on even sides with at least this many input
# channels (the forward and the input gradient), and this many for the weight gradient.
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS = 128
# auto policy: "taps" for the other stride-1 layers on maps of at most this many pixels.
TAPS_MAX_PIXELS = 25
# Winograd on inputs of at least WINOGRAD_MIN_CHUNKS chunks of ~WINOGRAD_CHUNK_BYTES: chunk by
# chunk (at batch 128, the 32x32x64 and 16x16x128 maps of ResNet-18; smaller inputs are not
# chunked: benchmarks/README.md, "Tried without a gain").
WINOGRAD_CHUNK_BYTES = 2 * 2**20
WINOGRAD_MIN_CHUNKS = 8
# "chunked" weight gradients: output pixels per chunk (rounded to whole images).
DW_CHUNK_PIXELS = 2048


def _is_nhwc_hwio(dimension_numbers: Any) -> bool:
    """True for flax's 2-D layout: lhs NHWC, rhs HWIO, out NHWC."""
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return (tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
                and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
                and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
    return tuple(dimension_numbers) == _DN


def explicit_padding(padding: Any, in_hw: Sequence[int], kernel_hw: Sequence[int],
                     strides: Sequence[int]) -> Padding:
    """((top, bottom), (left, right)) for lax's "SAME"/"VALID" or explicit padding."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
    return tuple(tuple(int(v) for v in p) for p in padding)


def output_hw(in_hw, kernel_hw, strides, padding) -> tuple[int, int]:
    """(height, width) of a convolution's or pooling's output."""
    return tuple((n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, padding))


def _native(x: Array, kernel: Array, strides, padding, precision=None) -> Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN,
                                    precision=precision)


def im2col(x: Array, kernel_hw: Sequence[int], strides: Sequence[int], padding: Padding) -> Array:
    """(B, H, W, C) -> (B, Ho, Wo, kh * kw * C) patches, feature order (kh, kw, C) to match a
    kernel (kh, kw, C, O) reshaped to (kh * kw * C, O). Pad + strided slices + concat only, so
    its transpose (the input gradient) is pads and adds, not a convolution."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    b, h, w, c = x.shape
    ho, wo = output_hw((h, w), kernel_hw, strides, padding)
    if any(lo or hi for lo, hi in padding):
        x = lax.pad(x, jnp.zeros((), x.dtype),
                    ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    cols = [lax.slice(x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _matmul(a: Array, b: Array, contract: tuple[int, int], precision=None) -> Array:
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision)


# ---------------------------------------------------------------------------------------------
# The convolution with a per-piece plan: forward, input gradient and weight gradient each in the
# formulation `choose` picked (custom VJP).

@dataclasses.dataclass(frozen=True)
class Plan:
    """How one convolution runs: forward in FORWARDS, input gradient in INPUT_GRADS, weight
    gradient in WEIGHT_GRADS. "native": XLA's convolution; "im2col": im2col + one matmul (its
    transpose for the input gradient); "dense": one matmul with `dense_operator`; "winograd":
    `winograd_conv` (3x3, stride 1, padding 1 only); "taps": one matmul per kernel tap
    (`taps_conv`, stride 1 only); "phases":
    stride-phase-split native convolutions (stride 1: native); "chunked": a loop over
    chunks of images, an im2col matmul each."""
    forward: str = "native"
    input_grad: str = "native"
    weight_grad: str = "native"


FORWARDS = ("native", "im2col", "dense", "winograd", "taps")
INPUT_GRADS = ("native", "phases", "im2col", "dense", "winograd", "taps")
WEIGHT_GRADS = ("native", "chunked", "im2col", "dense", "winograd", "taps")


def _dense_blocks(kernel_hw, in_hw, strides, padding):
    """For each (input pixel a, b; output pixel r, c) of the dense operator, the kernel tap that
    maps one to the other, or None."""
    (kh, kw), (h, w), (sh, sw), ((ph, _), (pw, _)) = kernel_hw, in_hw, strides, padding
    ho, wo = output_hw(in_hw, kernel_hw, strides, padding)
    taps = {}
    for a, b, r, c in np.ndindex(h, w, ho, wo):
        i, j = a + ph - r * sh, b + pw - c * sw
        taps[a, b, r, c] = (i, j) if 0 <= i < kh and 0 <= j < kw else None
    return taps


def dense_operator(kernel: Array, in_hw: Sequence[int], strides, padding) -> Array:
    """The convolution as one (H W Cin, Ho Wo Cout) matrix: block (a, b), (r, c) is the kernel
    tap that maps input pixel (a, b) to output pixel (r, c), zero where none does. For inputs
    smaller than the window it has fewer entries than the im2col matrix has taps, and no
    padding rows: 16 against 36 blocks of Cin x Cout for a 3x3 kernel over a 2x2 map."""
    kh, kw, cin, cout = kernel.shape
    h, w = in_hw
    ho, wo = output_hw(in_hw, (kh, kw), strides, padding)
    taps = _dense_blocks((kh, kw), in_hw, strides, padding)
    zero = jnp.zeros((cin, cout), kernel.dtype)
    return jnp.block([[zero if taps[a, b, r, c] is None else kernel[taps[a, b, r, c]]
                       for r in range(ho) for c in range(wo)]
                      for a in range(h) for b in range(w)])


def _dense_weight_grad(d_operator: Array, kernel_shape: Sequence[int], in_hw: Sequence[int],
                       strides, padding) -> Array:
    """The transpose of `dense_operator`: each tap sums the blocks it fills."""
    kh, kw, cin, cout = kernel_shape
    ho, wo = output_hw(in_hw, (kh, kw), strides, padding)
    blocks = d_operator.reshape(*in_hw, cin, ho, wo, cout)
    sums = {}
    for (a, b, r, c), tap in _dense_blocks((kh, kw), in_hw, strides, padding).items():
        if tap is not None:
            block = blocks[a, b, :, r, c]
            sums[tap] = block if tap not in sums else sums[tap] + block
    zero = jnp.zeros((cin, cout), d_operator.dtype)
    return jnp.stack([jnp.stack([sums.get((i, j), zero) for j in range(kw)]) for i in range(kh)])


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
# each 2x2 output tile from a 4x4 input tile with 16 multiplications instead of 36. Input tiles
# d -> B^T d B, kernel g -> G g G^T, their 16 elementwise products summed over input channels
# (16 matmuls), output A^T m A.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])


def _combine(coefficients: Sequence[float], terms: Sequence[Array]) -> Array:
    """sum_i coefficients[i] * terms[i], skipping zeros and multiplications by +-1."""
    total = None
    for c, term in zip(coefficients, terms):
        if c:
            term = term if c == 1 else -term if c == -1 else term * jnp.asarray(c, term.dtype)
            total = term if total is None else total + term
    return total


def winograd_applies(kernel_hw: Sequence[int], strides: Sequence[int], padding: Padding) -> bool:
    """`winograd_conv` computes 3x3 convolutions with stride 1 and padding 1 ("SAME")."""
    return (tuple(kernel_hw) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1)))


def _winograd_kernel(kernel: Array) -> list[list[Array]]:
    """G g G^T: the (Cin, Cout) matrices U[a][b], a, b < 4, of a (3, 3, Cin, Cout) kernel."""
    rows = [_combine(_WINOGRAD_G[a], list(kernel)) for a in range(4)]  # (3, cin, cout)
    return [[_combine(_WINOGRAD_G[c], list(rows[a])) for c in range(4)] for a in range(4)]


def _image_chunk(x: Array, i: Array, chunk: int) -> Array:
    """Images i * chunk ... (i + 1) * chunk - 1 of x. The chunked loops slice their operands
    in place rather than reshaping them to (chunks, chunk, ...): XLA:CPU fuses such a reshape
    into the operand's producer (BatchNorm, ReLU), which it then computes once per consumer when
    the forward and a gradient reshape differently (the Winograd and im2col chunks)."""
    return lax.dynamic_slice_in_dim(x, i * chunk, chunk)


def _winograd(x: Array, kernel_tiles: list[list[Array]], contract: int, precision) -> Array:
    """sum over input channels of (B^T d B) * U for every 2x2 output tile, then A^T m A.
    U[a][b] is (Cin, Cout) with contract=0 and (Cout, Cin) with contract=1. Large inputs go
    through a loop over chunks of ~WINOGRAD_CHUNK_BYTES, so the transforms and the matmuls
    of one chunk stay in cache (the forward and the input gradient; the weight gradient runs
    `_winograd_tiles` on the whole batch)."""
    b, h, w, cin = x.shape
    chunk = _largest_divisor_at_most(b, WINOGRAD_CHUNK_BYTES // (h * w * cin * x.dtype.itemsize))
    if b // chunk < WINOGRAD_MIN_CHUNKS:
        return _winograd_tiles(x, kernel_tiles, contract, precision)

    def body(i, y):
        y_chunk = _winograd_tiles(_image_chunk(x, i, chunk), kernel_tiles, contract, precision)
        return lax.dynamic_update_slice_in_dim(y, y_chunk, i * chunk, 0)

    cout = kernel_tiles[0][0].shape[1 - contract]
    return lax.fori_loop(0, b // chunk, body, jnp.zeros((b, h, w, cout), x.dtype))


def _winograd_tiles(x: Array, kernel_tiles: list[list[Array]], contract: int,
                    precision) -> Array:
    b, h, w, cin = x.shape
    th, tw = -(-h // 2), -(-w // 2)  # 2x2 output tiles per column / row
    xp = jnp.pad(x, ((0, 0), (1, 1 + 2 * th - h), (1, 1 + 2 * tw - w), (0, 0)))
    rows = [lax.slice_in_dim(xp, i, i + 2 * th - 1, 2, axis=1) for i in range(4)]
    rows = [_combine(_WINOGRAD_BT[a], rows) for a in range(4)]  # (b, th, 2 tw + 2, cin)
    products = []
    for a in range(4):
        cols = [lax.slice_in_dim(rows[a], j, j + 2 * tw - 1, 2, axis=2) for j in range(4)]
        products.append([
            _matmul(_combine(_WINOGRAD_BT[c], cols).reshape(-1, cin), kernel_tiles[a][c],
                    (1, contract), precision)
            for c in range(4)])  # (b th tw, cout)
    half = [[_combine(_WINOGRAD_AT[s], products[a]) for s in range(2)] for a in range(4)]
    tiles = jnp.stack([jnp.stack([_combine(_WINOGRAD_AT[r], [half[a][s] for a in range(4)])
                                  for s in range(2)], 1) for r in range(2)], 1)  # (., 2, 2, cout)
    y = tiles.reshape(b, th, tw, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * th, 2 * tw, -1)[:, :h, :w]


def winograd_conv(x: Array, kernel: Array, precision=None) -> Array:
    """3x3, stride-1, padding-1 NHWC x HWIO convolution by Winograd F(2x2, 3x3): 16 matmuls of
    (tiles, Cin) x (Cin, Cout), 44% of the direct method's multiplications. Odd sides are padded
    to whole tiles. The transforms are separable (rows, then columns) sums of strided slices."""
    return _winograd(x, _winograd_kernel(kernel), 0, precision)


def _winograd_input_grad(g: Array, kernel: Array, precision=None) -> Array:
    """d(winograd_conv)/dx: the same convolution of g with the kernel flipped and transposed.
    G flip(k) is G k with rows 0 and 3 swapped, so it reuses the kernel's U, taps permuted,
    contracted over Cout."""
    u = _winograd_kernel(kernel)
    flip = (3, 1, 2, 0)
    return _winograd(g, [[u[flip[a]][flip[c]] for c in range(4)] for a in range(4)], 1, precision)


# ---------------------------------------------------------------------------------------------
# Tap by tap, for stride-1 convolutions on small maps: one matmul per kernel tap, over the output
# pixels whose input under that tap lies inside the map, so nothing is multiplied by the zero
# padding (on a 3x3 map, 32 of the direct method's 81 (tap, pixel) products are).

def _tap_windows(in_hw: Sequence[int], kernel_hw: Sequence[int], padding: Padding):
    """(i, j, input window, output window) for each tap (i, j) of a stride-1 convolution that
    reaches the input; a window is ((row0, row1), (col0, col1))."""
    (h, w), (kh, kw), ((top, _), (left, _)) = in_hw, kernel_hw, padding
    ho, wo = output_hw(in_hw, kernel_hw, (1, 1), padding)
    windows = []
    for i in range(kh):
        r0, r1 = max(0, top - i), min(ho, h + top - i)
        for j in range(kw):
            c0, c1 = max(0, left - j), min(wo, w + left - j)
            if r0 < r1 and c0 < c1:
                inputs = ((r0 + i - top, r1 + i - top), (c0 + j - left, c1 + j - left))
                windows.append((i, j, inputs, ((r0, r1), (c0, c1))))
    return windows


def taps_conv(x: Array, kernel: Array, padding: Padding, precision=None) -> Array:
    """Stride-1 NHWC/HWIO convolution as one matmul per kernel tap, each zero-padded into the
    output at its window (its gradients, by jax.vjp, are the same matmuls transposed)."""
    ho, wo = output_hw(x.shape[1:3], kernel.shape[:2], (1, 1), padding)
    total = None
    for i, j, (in_rows, in_cols), (rows, cols) in _tap_windows(x.shape[1:3], kernel.shape[:2],
                                                               padding):
        patch = x[:, in_rows[0]:in_rows[1], in_cols[0]:in_cols[1]]
        y = _matmul(patch.reshape(-1, patch.shape[3]), kernel[i, j], (1, 0), precision)
        y = jnp.pad(y.reshape(patch.shape[:3] + (-1,)),
                    ((0, 0), (rows[0], ho - rows[1]), (cols[0], wo - cols[1]), (0, 0)))
        total = y if total is None else total + y
    return total


def _check_taps(strides) -> None:
    if tuple(strides) != (1, 1):
        raise ValueError(f"taps: stride 1 only; got strides {tuple(strides)}")


def _check_winograd(kernel_hw, strides, padding) -> None:
    if not winograd_applies(kernel_hw, strides, padding):
        raise ValueError(f"winograd: 3x3 kernels, stride 1, padding 1 only; got kernel "
                         f"{tuple(kernel_hw)}, strides {tuple(strides)}, padding {padding}")


def _forward(kind: str, x: Array, kernel: Array, strides, padding, precision) -> Array:
    if kind == "taps":
        _check_taps(strides)
        return taps_conv(x, kernel, padding, precision)
    if kind == "winograd":
        _check_winograd(kernel.shape[:2], strides, padding)
        return winograd_conv(x, kernel, precision)
    if kind == "native":
        return _native(x, kernel, strides, padding, precision)
    if kind == "dense":
        b, h, w, _ = x.shape
        ho, wo = output_hw((h, w), kernel.shape[:2], strides, padding)
        y = _matmul(x.reshape(b, -1), dense_operator(kernel, (h, w), strides, padding), (1, 0),
                    precision)
        return y.reshape(b, ho, wo, kernel.shape[3])
    kh, kw, cin, cout = kernel.shape
    cols = im2col(x, (kh, kw), strides, padding)
    y = _matmul(cols.reshape(-1, kh * kw * cin), kernel.reshape(-1, cout), (1, 0), precision)
    return y.reshape(cols.shape[:3] + (cout,))


def _phase_taps(k: int, s: int, p: int, r: int) -> tuple[list[int], int]:
    """Kernel taps t feeding input rows i = s * a + r, and the lowest offset d = (r + p - t) / s
    (row a of the phase reads g[a + d] for consecutive d), taps ordered by increasing d."""
    taps = [t for t in range(k) if (r + p - t) % s == 0]
    taps.sort(key=lambda t: (r + p - t) // s)
    return taps, ((r + p - taps[0]) // s if taps else 0)


def _input_grad_phases(g: Array, kernel: Array, in_shape: Sequence[int], strides, padding,
                       precision) -> Array:
    """d(conv)/d(input) of a strided convolution, split into stride_h * stride_w phases of the
    input, each a stride-1 native convolution of g with the kernel taps that reach that phase,
    interleaved back. (XLA runs it as one lhs-dilated convolution, which XLA:CPU runs slowly.)"""
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = in_shape
    (sh, sw), ((ph, _), (pw, _)) = strides, padding
    ho, wo = g.shape[1:3]
    nh, nw = -(-h // sh), -(-w // sw)  # phase rows / cols (inputs padded to multiples)
    kernel_t = jnp.swapaxes(kernel, 2, 3)  # (kh, kw, cout, cin)
    rows = []
    for r in range(sh):
        taps_h, dh = _phase_taps(kh, sh, ph, r)
        cols = []
        for c in range(sw):
            taps_w, dw = _phase_taps(kw, sw, pw, c)
            if not taps_h or not taps_w:
                cols.append(jnp.zeros((b, nh, nw, cin), g.dtype))
                continue
            sub = kernel_t[np.array(taps_h)][:, np.array(taps_w)]
            pad = ((-dh, nh - ho + dh + len(taps_h) - 1), (-dw, nw - wo + dw + len(taps_w) - 1))
            cols.append(_native(g, sub, (1, 1), pad, precision))
        rows.append(jnp.stack(cols, axis=3))  # (b, nh, nw, sw, cin)
    dx = jnp.stack(rows, axis=2)  # (b, nh, sh, nw, sw, cin)
    dx = dx.reshape(b, nh * sh, nw * sw, cin)
    return dx[:, :h, :w]


def _input_grad(kind: str, g: Array, kernel: Array, in_shape: Sequence[int], strides, padding,
                precision) -> Array:
    if kind == "phases" and tuple(strides) != (1, 1):
        return _input_grad_phases(g, kernel, in_shape, strides, padding, precision)
    if kind == "winograd":
        _check_winograd(kernel.shape[:2], strides, padding)
        return _winograd_input_grad(g, kernel, precision)
    if kind == "dense":
        operator = dense_operator(kernel, in_shape[1:3], strides, padding)
        return _matmul(g.reshape(g.shape[0], -1), operator, (1, 1), precision).reshape(in_shape)
    x0 = jnp.zeros(in_shape, g.dtype)
    if kind == "taps":
        _check_taps(strides)
        return jax.vjp(lambda v: taps_conv(v, kernel, padding, precision), x0)[1](g)[0]
    if kind == "im2col":  # dcols = g kernel^T, then col2im (the transpose of im2col: pads, adds)
        kh, kw, cin, cout = kernel.shape
        cols, col2im = jax.vjp(lambda v: im2col(v, (kh, kw), strides, padding), x0)
        dcols = _matmul(g.reshape(-1, cout), kernel.reshape(-1, cout), (1, 1), precision)
        return col2im(dcols.reshape(cols.shape))[0]
    return jax.vjp(lambda v: _native(v, kernel, strides, padding, precision), x0)[1](g)[0]


def _largest_divisor_at_most(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    return max(d for d in range(1, limit + 1) if n % d == 0)


def _weight_grad_chunked(x: Array, g: Array, kernel_shape: Sequence[int], strides, padding,
                         precision, chunk_pixels: int) -> Array:
    """sum over chunks of images of im2col(x_c)^T g_c (a loop), each chunk about chunk_pixels
    output pixels: the im2col copy of a chunk stays in cache."""
    kh, kw, cin, cout = kernel_shape
    b = x.shape[0]
    ho, wo = g.shape[1:3]
    chunk = _largest_divisor_at_most(b, chunk_pixels // (ho * wo))

    def body(i, acc):
        cols = im2col(_image_chunk(x, i, chunk), (kh, kw), strides, padding)
        g_chunk = _image_chunk(g, i, chunk).reshape(-1, cout)
        return acc + _matmul(g_chunk, cols.reshape(-1, kh * kw * cin), (0, 0),
                             precision).astype(acc.dtype)

    acc = jnp.zeros((cout, kh * kw * cin), jnp.promote_types(x.dtype, jnp.float32))
    return lax.fori_loop(0, b // chunk, body, acc).T.reshape(kernel_shape)


def _weight_grad(kind: str, x: Array, g: Array, kernel_shape: Sequence[int], strides, padding,
                 precision) -> Array:
    if kind == "dense":  # d(operator) = x^T g, summed back into the taps
        d_operator = _matmul(x.reshape(x.shape[0], -1), g.reshape(g.shape[0], -1), (0, 0),
                             precision)
        return _dense_weight_grad(d_operator, kernel_shape, x.shape[1:3], strides, padding)
    if kind == "chunked":
        return _weight_grad_chunked(x, g, kernel_shape, strides, padding, precision,
                                    DW_CHUNK_PIXELS)
    if kind == "im2col":
        kh, kw, cin, cout = kernel_shape
        cols = im2col(x, (kh, kw), strides, padding).reshape(-1, kh * kw * cin)
        return _matmul(cols, g.reshape(-1, cout), (0, 0), precision).reshape(kernel_shape)
    k0 = jnp.zeros(kernel_shape, x.dtype)
    if kind == "taps":
        _check_taps(strides)
        return jax.vjp(lambda k: taps_conv(x, k, padding, precision), k0)[1](g)[0]
    if kind == "winograd":  # 16 matmuls (tiles^T tiles) in the transformed domain; unchunked:
        # under jax.vjp, `_winograd`'s loop would keep every chunk's tiles as residuals
        _check_winograd(kernel_shape[:2], strides, padding)
        return jax.vjp(lambda k: _winograd_tiles(x, _winograd_kernel(k), 0, precision),
                       k0)[1](g)[0]
    return jax.vjp(lambda k: _native(x, k, strides, padding, precision), k0)[1](g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_planned(x: Array, kernel: Array, strides: tuple[int, int], padding: Padding,
                 precision: Any = None, plan: Plan = Plan()) -> Array:
    """NHWC x HWIO convolution (equals lax.conv_general_dilated), each piece as `plan` says."""
    return _forward(plan.forward, x, kernel, strides, padding, precision)


def _planned_fwd(x, kernel, strides, padding, precision, plan):
    return conv_planned(x, kernel, strides, padding, precision, plan), (x, kernel)


def _planned_bwd(strides, padding, precision, plan, residuals, g):
    x, kernel = residuals
    dx = _input_grad(plan.input_grad, g, kernel, x.shape, strides, padding, precision)
    dkernel = _weight_grad(plan.weight_grad, x, g, kernel.shape, strides, padding, precision)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv_planned.defvjp(_planned_fwd, _planned_bwd)


# ---------------------------------------------------------------------------------------------
# Selection and the nn.Conv hook.

def choose(in_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
           padding: Padding, policy: str = "auto") -> Plan:
    """The plan for one NHWC/HWIO convolution. "native" / "im2col": every piece so; "auto": the
    formulation for the layer's shape that the module docstring gives."""
    if policy in ("native", "im2col"):
        return Plan(policy, policy, policy)
    h, w = in_shape[1:3]
    kh, kw = kernel_shape[:2]
    ho, wo = output_hw((h, w), (kh, kw), strides, padding)
    if kh > h or kw > w:  # XLA would swap the operands and run the result very slowly
        return Plan("dense", "dense", "dense")
    if (winograd_applies((kh, kw), strides, padding) and h % 2 == 0 and w % 2 == 0
            and in_shape[3] >= WINOGRAD_MIN_CHANNELS):
        weight_grad = ("winograd" if in_shape[3] >= WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS
                       else "chunked")
        return Plan("winograd", "winograd", weight_grad)
    if tuple(strides) == (1, 1) and h * w <= TAPS_MAX_PIXELS:
        return Plan("taps", "taps", "taps")
    if tuple(strides) == (1, 1):
        input_grad = "native"
    else:  # small strided outputs are skinny matmuls
        input_grad = "im2col" if ho * wo <= IM2COL_MAX_OUTPUT_PIXELS else "phases"
    if kh * kw == 1:
        weight_grad = "im2col"
    elif kh * kw > 9:  # the 7x7 stem: im2col rows of 49 x 3 values, mostly copying
        weight_grad = "native"
    else:
        weight_grad = "chunked"
    return Plan("native", input_grad, weight_grad)


def make_conv_general_dilated(policy: str = "auto") -> Callable[..., Array]:
    """A function with lax.conv_general_dilated's signature (what nn.Conv calls) that runs 2-D
    NHWC/HWIO convolutions without dilation or groups in the formulation `choose` picks, and
    everything else through lax.conv_general_dilated."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             batch_group_count=1, precision=None, preferred_element_type=None,
                             **kwargs):
        plain = (lhs.ndim == 4 and _is_nhwc_hwio(dimension_numbers) and not kwargs
                 and feature_group_count == 1 and batch_group_count == 1
                 and preferred_element_type is None and lhs.dtype == rhs.dtype
                 and all(d == 1 for d in (lhs_dilation or (1, 1)))
                 and all(d == 1 for d in (rhs_dilation or (1, 1))))
        if plain:
            strides = tuple(int(s) for s in window_strides)
            pads = explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
            plan = choose(lhs.shape, rhs.shape, strides, pads, policy)
            return conv_planned(lhs, rhs, strides, pads, precision, plan)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type, **kwargs)

    conv_general_dilated.__name__ = f"cpu_conv_general_dilated_{policy}"
    return conv_general_dilated


_CONV_FNS = {policy: make_conv_general_dilated(policy) for policy in POLICIES}


def cpu_conv(policy: str = "auto") -> Callable[..., nn.Conv]:
    """nn.Conv running the CPU formulations; same attributes, parameters and auto-names."""
    return functools.partial(nn.Conv, conv_general_dilated=_CONV_FNS[policy])


CpuConv = cpu_conv("auto")
