"""The CPU formulations of vi_simsiam_jax.conv equal XLA's native convolution / nn.Conv and
nn.max_pool: outputs, gradients (input and kernel) to float64 roundoff, parameter trees, tie
handling."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_simsiam_jax.cpu import conv as conv_lib
from vi_simsiam_jax import backends
from vi_simsiam_jax.cpu import pooling

HIGHEST = jax.lax.Precision.HIGHEST

# (input side, cin, cout, kernel, stride, padding): the convolutions of ResNet-18 (7x7/2 p3 stem,
# 3x3/1 p1, 3x3/2 p1, 1x1/2 p0 shortcut), incl. odd sides, inputs smaller than the window (2x2
# and 1x1 maps under a 3x3 kernel, which XLA rewrites), a 3x3/1 stem on 3 channels, the
# channel counts at which the auto plan takes Winograd (16: forward and input gradient; 128:
# weight gradient too) and small odd maps, which it runs tap by tap.
CASES = [
    (11, 3, 8, 7, 2, 3),
    (10, 3, 8, 3, 1, 1),
    (9, 4, 8, 3, 1, 1),
    (2, 8, 8, 3, 1, 1),
    (8, 16, 8, 3, 1, 1),
    (4, 128, 8, 3, 1, 1),
    (3, 8, 8, 3, 1, 1),
    (5, 16, 8, 3, 1, 1),
    (1, 8, 8, 3, 1, 1),
    (8, 4, 8, 3, 2, 1),
    (7, 4, 8, 3, 2, 1),
    (8, 4, 8, 1, 2, 0),
    (7, 4, 8, 1, 2, 0),
]


# Every comparison in float64: the formulations are the same math (products of the same values,
# summed in other orders; Winograd's transforms have coefficients 0, +-1 and +-1/2), and in
# float32 their roundoff would set the tolerance.
pytestmark = pytest.mark.usefixtures("x64")


# An output sums n <= 9 x 128 products; in any order its float64 roundoff is <= n eps64 times
# the sum of their magnitudes (~6x the largest output here), <= 1e-12 of the largest output
# (Winograd: a few times more). 1e-11 holds that; a wrong tap, pad or phase is an O(1) error.
def _assert_close(actual, expected, tol=1e-11):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype == np.float64
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def _conv_and_grads(impl, x, w, g, stride, pad):
    y, vjp = jax.vjp(lambda a, b: impl(a, b, (stride, stride), ((pad, pad), (pad, pad)),
                                       HIGHEST), x, w)
    return (y, *vjp(g))


def _native(x, w, strides, padding, precision):
    return jax.lax.conv_general_dilated(x, w, strides, padding, precision=precision,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Every formulation of every piece at least once: (forward, input gradient, weight gradient).
PLANS = [conv_lib.Plan("im2col", "im2col", "im2col"), conv_lib.Plan("native", "phases", "chunked"),
         conv_lib.Plan("native", "native", "native"), conv_lib.Plan("dense", "dense", "dense")]


@pytest.mark.parametrize("size,cin,cout,k,stride,pad", CASES)
def test_formulations_equal_native_convolution(size, cin, cout, k, stride, pad):
    kx, kw, kg = jax.random.split(jax.random.key(size * 100 + k), 3)
    x = jax.random.normal(kx, (3, size, size, cin), jnp.float64)
    w = jax.random.normal(kw, (k, k, cin, cout), jnp.float64) / np.sqrt(k * k * cin)
    out = (size + 2 * pad - k) // stride + 1
    g = jax.random.normal(kg, (3, out, out, cout), jnp.float64)
    pads = ((pad, pad), (pad, pad))
    plans = PLANS + [conv_lib.choose(x.shape, w.shape, (stride, stride), pads)]
    if conv_lib.winograd_applies((k, k), (stride, stride), pads):
        plans.append(conv_lib.Plan("winograd", "winograd", "winograd"))
    if stride == 1:
        plans.append(conv_lib.Plan("taps", "taps", "taps"))

    @jax.jit
    def all_plans(x, w, g):
        return [_conv_and_grads(_native, x, w, g, stride, pad)] + [
            _conv_and_grads(functools.partial(conv_lib.conv_planned, plan=plan), x, w, g,
                            stride, pad) for plan in plans]

    reference, *formulations = all_plans(x, w, g)
    for result in formulations:  # output, d/dx, d/dkernel
        for actual, expected in zip(result, reference):
            _assert_close(actual, expected)


def _three_layer_net(conv_module):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return [conv_module(features=4, kernel_size=(3, 3), strides=(2, 2),
                                padding=((1, 1), (1, 1)), use_bias=False, precision=HIGHEST)(x),
                    conv_module(features=4, kernel_size=(3, 3), padding="SAME",
                                precision=HIGHEST)(x),
                    conv_module(features=4, kernel_size=(1, 1), strides=(2, 2), padding="VALID",
                                precision=HIGHEST)(x)]
    return Net()


def test_module_equals_nn_conv():
    """Same parameter tree (names, shapes, initial values), outputs and gradients as nn.Conv,
    for every policy, with flax's padding forms and a bias."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3), jnp.float64)

    def value_and_grads(net, params):
        loss = lambda params, x: sum(jnp.sum(jnp.sin(y)) for y in net.apply(params, x))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    plain = _three_layer_net(nn.Conv)
    params = plain.init(jax.random.key(0), x)
    for policy in conv_lib.POLICIES:
        net = _three_layer_net(conv_lib.cpu_conv(policy))
        cpu_params = net.init(jax.random.key(0), x)
        assert jax.tree.structure(cpu_params) == jax.tree.structure(params)
        jax.tree.map(np.testing.assert_array_equal, cpu_params, params)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    value, grads = value_and_grads(plain, params)
    for policy in conv_lib.POLICIES:
        net = _three_layer_net(conv_lib.cpu_conv(policy))
        cpu_value, cpu_grads = value_and_grads(net, params)
        _assert_close(cpu_value, value)
        jax.tree.map(_assert_close, cpu_grads, grads)


def test_chunked_weight_gradient_with_several_chunks(monkeypatch):
    monkeypatch.setattr(conv_lib, "DW_CHUNK_PIXELS", 128)  # 2 images of 8x8 per chunk: 3 chunks
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (6, 8, 8, 4), jnp.float64)
    w = jax.random.normal(kw, (3, 3, 4, 8), jnp.float64)
    g = jax.random.normal(kg, (6, 8, 8, 8), jnp.float64)
    chunked = functools.partial(conv_lib.conv_planned,
                                plan=conv_lib.Plan("native", "native", "chunked"))
    result = jax.jit(lambda x, w, g: _conv_and_grads(chunked, x, w, g, 1, 1))(x, w, g)
    for actual, expected in zip(result, _conv_and_grads(_native, x, w, g, 1, 1)):
        _assert_close(actual, expected)


def test_winograd_in_chunks(monkeypatch):
    """Inputs of WINOGRAD_MIN_CHUNKS chunks or more go through the chunked (fori_loop) Winograd:
    here 8 chunks of two 6x6x16 images, in the forward and the input gradient."""
    monkeypatch.setattr(conv_lib, "WINOGRAD_CHUNK_BYTES", 2 * 6 * 6 * 16 * 8)  # float64
    kx, kw, kg = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (16, 6, 6, 16), jnp.float64)
    w = jax.random.normal(kw, (3, 3, 16, 16), jnp.float64) / 12
    g = jax.random.normal(kg, (16, 6, 6, 16), jnp.float64)
    winograd = functools.partial(conv_lib.conv_planned,
                                 plan=conv_lib.Plan("winograd", "winograd", "winograd"))
    conv_and_grads = lambda x, w, g: _conv_and_grads(winograd, x, w, g, 1, 1)
    assert str(jax.make_jaxpr(conv_and_grads)(x, w, g)).count("length=8") == 2
    result = jax.jit(conv_and_grads)(x, w, g)
    for actual, expected in zip(result, _conv_and_grads(_native, x, w, g, 1, 1)):
        _assert_close(actual, expected)


def test_auto_choice():
    plan, pads = conv_lib.Plan, ((1, 1), (1, 1))
    choose = conv_lib.choose
    assert (choose((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), pads)
            == plan("dense", "dense", "dense"))
    assert (choose((128, 4, 4, 256), (3, 3, 256, 512), (2, 2), pads)
            == plan("native", "im2col", "chunked"))
    assert (choose((128, 32, 32, 64), (3, 3, 64, 128), (2, 2), pads)
            == plan("native", "phases", "chunked"))
    assert (choose((128, 32, 32, 64), (1, 1, 64, 128), (2, 2), ((0, 0), (0, 0)))
            == plan("native", "phases", "im2col"))
    assert (choose((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), pads)
            == plan("winograd", "winograd", "chunked"))
    assert (choose((128, 8, 8, 256), (3, 3, 256, 256), (1, 1), pads)
            == plan("winograd", "winograd", "winograd"))
    assert (choose((128, 3, 3, 512), (3, 3, 512, 512), (1, 1), pads)  # small odd side
            == plan("taps", "taps", "taps"))
    assert (choose((128, 7, 7, 256), (3, 3, 256, 256), (1, 1), pads)  # larger odd side
            == plan("native", "native", "chunked"))
    assert (choose((128, 32, 32, 3), (3, 3, 3, 64), (1, 1), pads)  # cifar stem
            == plan("native", "native", "chunked"))
    assert (choose((128, 128, 128, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)))  # imagenet stem
            == plan("native", "phases", "native"))
    assert choose((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), pads, "native") == plan()


def test_winograd_refuses_other_convolutions():
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    with pytest.raises(ValueError, match="winograd: 3x3 kernels, stride 1, padding 1"):
        conv_lib.conv_planned(x, w, (2, 2), ((1, 1), (1, 1)), None,
                              conv_lib.Plan("winograd", "native", "native"))


def test_taps_refuses_strided_convolutions():
    x, w = jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 4, 4))
    with pytest.raises(ValueError, match="taps: stride 1 only"):
        conv_lib.conv_planned(x, w, (2, 2), ((1, 1), (1, 1)), None,
                              conv_lib.Plan("taps", "native", "native"))


def test_backend_selection():
    assert backends.select("auto", "gpu") == (nn.Conv, nn.max_pool)
    assert backends.select("auto", "tpu") == (nn.Conv, nn.max_pool)
    assert backends.select("auto", "cpu") == (conv_lib.CpuConv, pooling.max_pool)
    assert conv_lib.CpuConv.func is nn.Conv
    assert backends.select("xla", "cpu") == (nn.Conv, nn.max_pool)
    im2col, _ = backends.select("cpu_im2col", "gpu")
    assert im2col.keywords["conv_general_dilated"].__name__.endswith("_im2col")


@pytest.mark.parametrize("window,strides,padding", [
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool
    ((2, 2), (2, 2), "VALID"),
    ((3, 3), (1, 1), "SAME"),
])
def test_max_pool_equals_nn_max_pool(window, strides, padding):
    """Values and gradients, with many ties (ReLU zeros, rounded values): the gradient goes to
    the first maximal element of each window, as nn.max_pool's does."""
    kx, kg = jax.random.split(jax.random.key(0))
    x = jnp.round(jax.nn.relu(jax.random.normal(kx, (2, 9, 9, 3))) * 2) / 2
    ref = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
    cpu = lambda x: pooling.max_pool(x, window, strides=strides, padding=padding)
    y_ref, vjp_ref = jax.vjp(ref, x)
    y, vjp = jax.vjp(jax.jit(cpu), x)
    np.testing.assert_array_equal(y, y_ref)
    g = jax.random.normal(kg, y.shape)
    _assert_close(vjp(g)[0], vjp_ref(g)[0])


def test_max_pool_propagates_nan():
    x = np.ones((1, 5, 5, 1), np.float32)
    x[0, 1, 1, 0] = np.nan
    y = pooling.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    y_ref = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))


def test_training_model_equals_plain_flax_model():
    """The SiameseNet that train_state.make_model builds on CPU (CPU convolutions and max-pool) has
    the parameter tree of one built from nn.Conv / nn.max_pool, and the same outputs, BN statistics
    and parameter gradients (imagenet stem at 32 px: strided, 1x1 and 1x1-output convs). Through
    20 layers with BatchNorm, float32 roundoff alone moves some gradients by 4e-5 (plain model,
    batch order reversed), ~3e2 eps32: in float64 ~1e-13, inside _assert_close's 1e-11."""
    from tests import tiny_config
    from vi_simsiam_jax import train_state

    config = tiny_config.get_config()
    config.model.stem, config.conv = "imagenet", "auto"
    model = train_state.make_model(config, axis_name=None)
    assert model.conv is not nn.Conv and model.max_pool is pooling.max_pool
    plain = model.clone(conv=nn.Conv, max_pool=nn.max_pool)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3), jnp.float64)
    variables = plain.init(jax.random.key(1), x, False)
    assert (jax.tree.map(jnp.shape, model.init(jax.random.key(1), x, False))
            == jax.tree.map(jnp.shape, variables))

    def loss(params, net):
        out, stats = net.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out.mu)) + jnp.sum(out.kappa) + jnp.sum(out.z ** 2), (out, stats)

    x, variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (x, variables))
    results = [jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(
        variables["params"], net.clone(dtype=jnp.float64)) for net in (model, plain)]
    jax.tree.map(_assert_close, *results)


_COMPILED_CONV = """
from vi_simsiam_jax import launch
launch.configure("__main__")
import jax, jax.numpy as jnp
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
lowered = jax.jit(conv).lower(jnp.zeros((8, 16, 16, 32)), jnp.zeros((3, 3, 32, 32)))
print(lowered.compile().as_text())
"""


@pytest.mark.parametrize("setup", ["1", "0"])
def test_cpu_process_takes_convolutions_from_ynnpack(setup):
    """cpu.process's XLA flag leaves convolutions to XLA's (multi-threaded) Eigen convolution
    instead of a YNNPACK fusion (one thread in jaxlib 0.10.2); without it they are in one."""
    env = {**os.environ, "VI_SIMSIAM_CPU_SETUP": setup, "JAX_PLATFORMS": "cpu"}
    hlo = subprocess.run([sys.executable, "-c", _COMPILED_CONV], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "convolution(" in hlo
    assert ("ynn_fusion" in hlo) == (setup == "0")
