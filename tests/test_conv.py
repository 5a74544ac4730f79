"""The CPU convolution formulations equal nn.Conv: outputs, gradients, parameter trees."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_simsiam_jax import conv as conv_lib

# (input side, cin, cout, kernel, stride, padding): every convolution ResNet-18 uses, on inputs
# large enough for the "direct" path and small enough for the "im2col" one, incl. inputs
# smaller than the window (2x2 and 1x1 maps under a 3x3 kernel) and odd sides.
CASES = [
    (16, 3, 8, 7, 2, 3),   # imagenet stem
    (9, 3, 8, 7, 2, 3),
    (12, 3, 8, 3, 1, 1),   # cifar stem, stage convs
    (2, 8, 8, 3, 1, 1),    # 2x2 map (XLA swaps this one's operands)
    (1, 8, 8, 3, 1, 1),
    (3, 8, 8, 3, 1, 1),
    (12, 4, 8, 3, 2, 1),   # first conv of a stage
    (7, 4, 8, 3, 2, 1),
    (4, 4, 8, 3, 2, 1),
    (12, 4, 8, 1, 2, 0),   # shortcut
    (7, 4, 8, 1, 2, 0),
    (2, 4, 8, 1, 2, 0),
]
FORMULATIONS = ["im2col", "direct"]


def _reference(x, w, stride, pad):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def _inputs(size, cin, cout, k, batch=3, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, size, size, cin), jnp.float32)
    w = jax.random.normal(kw, (k, k, cin, cout), jnp.float32) / np.sqrt(k * k * cin)
    return x, w, kg


def _assert_close(actual, expected, tol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("size,cin,cout,k,stride,pad", CASES)
def test_outputs_and_gradients_equal_lax_conv(formulation, size, cin, cout, k, stride, pad):
    x, w, kg = _inputs(size, cin, cout, k)
    impl = {"im2col": conv_lib.conv_im2col, "direct": conv_lib.conv_direct}[formulation]
    f = jax.jit(lambda x, w: impl(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                  jax.lax.Precision.HIGHEST))
    ref = jax.jit(functools.partial(_reference, stride=stride, pad=pad))
    y, y_ref = f(x, w), ref(x, w)
    _assert_close(y, y_ref)
    g = jax.random.normal(kg, y_ref.shape, jnp.float32)
    dx, dw = jax.vjp(f, x, w)[1](g)
    dx_ref, dw_ref = jax.vjp(ref, x, w)[1](g)
    _assert_close(dx, dx_ref)
    _assert_close(dw, dw_ref)


def test_chunked_weight_gradient_with_many_chunks():
    x, w, kg = _inputs(8, 4, 8, 3, batch=6)
    g = jax.random.normal(kg, (6, 8, 8, 8), jnp.float32)
    pads = ((1, 1), (1, 1))
    dw = conv_lib.weight_grad_chunked(x, g, w.shape, (1, 1), pads, chunk_pixels=128,
                                      precision=jax.lax.Precision.HIGHEST)  # 3 chunks of 2
    dw_ref = jax.vjp(lambda v: _reference(x, v, 1, 1), w)[1](g)[0]
    _assert_close(dw, dw_ref)


@pytest.mark.parametrize("policy", ["auto", "im2col", "direct"])
def test_module_equals_nn_conv(policy):
    """Same parameter tree (names, shapes, initial values), outputs and gradients as nn.Conv,
    with flax's own padding forms and a bias."""
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 3), jnp.float32)
    for kwargs in [dict(features=8, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        use_bias=False),
                   dict(features=8, kernel_size=(3, 3), padding="SAME"),
                   dict(features=8, kernel_size=(1, 1), strides=(2, 2), padding="VALID")]:
        plain, cpu = nn.Conv(**kwargs), conv_lib.cpu_conv(policy)(**kwargs)
        params = plain.init(jax.random.key(0), x)
        cpu_params = cpu.init(jax.random.key(0), x)
        assert jax.tree.structure(params) == jax.tree.structure(cpu_params)
        jax.tree.map(np.testing.assert_array_equal, params, cpu_params)
        loss = lambda module, p, x: jnp.sum(jnp.sin(module.apply(p, x)))
        val, grads = jax.value_and_grad(functools.partial(loss, plain), argnums=(0, 1))(params, x)
        cpu_val, cpu_grads = jax.value_and_grad(functools.partial(loss, cpu), argnums=(0, 1))(
            params, x)
        _assert_close(cpu_val, val)
        jax.tree.map(_assert_close, cpu_grads, grads)


def test_auto_choice():
    pads = ((1, 1), (1, 1))
    assert conv_lib.choose((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), pads) == "im2col"
    assert conv_lib.choose((128, 4, 4, 256), (3, 3, 256, 512), (2, 2), pads) == "im2col"
    assert conv_lib.choose((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), pads) == "direct"
    assert conv_lib.choose((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), pads, "native") == "native"


def test_conv_for_backend():
    assert conv_lib.conv_for_backend("gpu") is nn.Conv
    assert conv_lib.conv_for_backend("tpu") is nn.Conv
    assert conv_lib.conv_for_backend("cpu").func is nn.Conv
