"""ResNet-18 backbone, heads, SiameseNet, multi-view forward, EMA and target projections."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import float64
from vi_simsiam_jax import methods, models

SIZES = (32, 64, 96, 128, 160, 224)
TINY = dict(width=4, proj_hidden_dim=16, dim=8, pred_dim=4)


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _shape_init(model: nn.Module, x_shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape), train=False))


def _random_variables(model: nn.Module, x_shape, seed: int = 0):
    """Variables of init's structure filled with numpy draws: no XLA compile of the initialisers
    (threefry init of a ResNet takes ~10 s of CPU to compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.3
        return jnp.asarray(rng.normal(size=leaf.shape) * scale + (name == "scale"), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _shape_init(model, x_shape))


def _run(net: nn.Module, variables, inputs, train: bool, method=None, **kwargs):
    """net.apply under jit (one XLA compile, instead of one per op in eager mode); with train,
    returns (output, updated batch_stats) like apply with mutable=["batch_stats"]."""
    mutable = ["batch_stats"] if train else False
    return jax.jit(lambda v, x: net.apply(v, x, train, method=method, mutable=mutable, **kwargs))(
        variables, inputs)


def _normal(shape, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _torch_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def test_imagenet_backbone_param_count():
    variables = _shape_init(models.ResNet18(stem="imagenet"), (1, 224, 224, 3))
    # torchvision resnet18 has 11,689,512 parameters; its fc layer has 512 * 1000 + 1000.
    assert _count(variables["params"]) == 11_689_512 - 513_000 == 11_176_512
    assert set(variables) == {"params", "batch_stats"}
    # No conv has a bias; every kernel is (kh, kw, cin, cout).
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        name = path[-1].key
        assert name in ("kernel", "scale", "bias")
        if name == "kernel":
            assert leaf.ndim == 4
        else:
            assert "bn" in path[-2].key


@pytest.mark.parametrize("stem", models.STEMS)
@pytest.mark.parametrize("size", SIZES)
def test_backbone_output_shapes(stem, size):
    model = models.ResNet18(stem=stem)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = _shape_init(model, x.shape)
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                 mutable=["intermediates"]), variables, x)
    assert out.shape == (2, 512)
    # Spatial size of the last block from torch's conv arithmetic (floor, symmetric padding).
    s = size
    if stem == "imagenet":
        s = _torch_out(_torch_out(s, 7, 2, 3), 3, 2, 1)
    for _ in range(3):
        s = _torch_out(s, 3, 2, 1)
    assert state["intermediates"]["layer4_1"]["__call__"][0].shape == (2, s, s, 512)


def test_stem_padding_is_torchvision_symmetric():
    """Corner outputs of the 7x7/2 stem conv equal a direct correlation with 3 zeros each side."""
    model = models.ResNet18(stem="imagenet", width=2)
    x = _normal((1, 20, 20, 3), seed=1)
    variables = _random_variables(model, x.shape)
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                                mutable=["intermediates"]))(variables, x)
    out = np.asarray(state["intermediates"]["conv1"]["__call__"][0])
    kernel = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
    xp = np.pad(np.asarray(x, np.float64)[0], ((3, 3), (3, 3), (0, 0)))
    assert out.shape == (1, 10, 10, 2)
    for oy, ox in [(0, 0), (0, 9), (9, 9), (4, 7)]:
        patch = xp[2 * oy:2 * oy + 7, 2 * ox:2 * ox + 7]
        np.testing.assert_allclose(out[0, oy, ox], np.einsum("hwc,hwco->o", patch, kernel),
                                   rtol=1e-4, atol=1e-5)


def test_conv_is_injectable():
    """A replacement conv module with nn.Conv's call signature yields the same parameter tree."""
    calls = []

    class CountingConv(nn.Conv):
        def __call__(self, x):
            calls.append(self.name)
            return super().__call__(x)

    shapes = lambda conv: jax.tree.map(  # noqa: E731
        lambda a: a.shape, _shape_init(models.ResNet18(conv=conv, width=8), (1, 32, 32, 3)))
    assert shapes(CountingConv) == shapes(nn.Conv)
    assert len(calls) == 1 + 4 * 2 * 2 + 3  # stem, 2 convs per block, 3 downsamples


def test_zero_init_residual():
    model = models.ResNet18(stem="cifar", width=2, zero_init_residual=True)
    init = jax.jit(functools.partial(model.init, train=False))
    params = init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 3)))["params"]
    for stage in range(1, 5):
        for block in range(2):
            np.testing.assert_array_equal(params[f"layer{stage}_{block}"]["bn2"]["scale"], 0.0)
            np.testing.assert_array_equal(params[f"layer{stage}_{block}"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
    assert float(jnp.std(params["layer1_0"]["conv1"]["kernel"])) > 0
    norm = functools.partial(nn.BatchNorm, use_running_average=True)
    block = models.BasicBlock(4, 1, nn.Conv, norm, zero_init_residual=False)
    block_params = block.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 4, 4, 4)))["params"]
    np.testing.assert_array_equal(block_params["bn2"]["scale"], 1.0)


def test_heads_structure_and_full_size_dims():
    variables = _shape_init(models.SiameseNet(kappa=True), (1, 32, 32, 3))
    shapes = jax.tree.map(lambda a: a.shape, variables["params"])
    assert set(shapes) == {"backbone", "projector", "predictor"}
    assert shapes["projector"] == {
        "fc1": {"kernel": (512, 2048)}, "bn1": {"scale": (2048,), "bias": (2048,)},
        "fc2": {"kernel": (2048, 2048)}, "bn2": {"scale": (2048,), "bias": (2048,)},
        "fc3": {"kernel": (2048, 2048)}}  # last BN has no affine parameters
    assert variables["batch_stats"]["projector"]["bn3"]["mean"].shape == (2048,)
    assert shapes["predictor"] == {
        "fc1": {"kernel": (2048, 512)}, "bn1": {"scale": (512,), "bias": (512,)},
        "fc2": {"kernel": (512, 2049), "bias": (2049,)}}  # + 1 output for kappa
    simsiam = _shape_init(models.SiameseNet(kappa=False), (1, 32, 32, 3))["params"]
    assert simsiam["predictor"]["fc2"]["kernel"].shape == (512, 2048)
    assert _count(simsiam["backbone"]) == 11_176_512


@pytest.mark.parametrize("kappa", [False, True])
def test_siamese_outputs(kappa):
    net = models.SiameseNet(kappa=kappa, stem="cifar", kappa_min=0.5, **TINY)
    x = _normal((5, 8, 8, 3), seed=1)
    variables = _random_variables(net, x.shape)
    out, _ = _run(net, variables, x, True)
    assert out.features.shape == (5, 32) and out.z.shape == (5, 8) and out.mu.shape == (5, 8)
    np.testing.assert_allclose(jnp.linalg.norm(out.mu, axis=-1), 1.0, rtol=1e-5)
    if kappa:
        assert out.kappa.shape == (5,) and bool(jnp.all(out.kappa > 0.5))
    else:
        assert out.kappa is None
    target = _run(net, variables, x, False, predict=False)
    assert target.mu is None and target.kappa is None and target.z.shape == (5, 8)


def test_invalid_configuration_raises():
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="stem"):
        models.ResNet18(stem="tiny", width=2).init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="kappa_map"):
        models.kappa_from_raw(jnp.zeros(3), "relu")


def test_kappa_from_raw():
    raw = jnp.array([-1e4, -3.0, 0.0, 3.0, 50.0])
    for kappa_map in models.KAPPA_MAPS:
        kappa = models.kappa_from_raw(raw, kappa_map, kappa_min=2.0)
        assert kappa.dtype == jnp.float32
        assert float(kappa[0]) == 2.0  # exactly at its floor for very negative raw
        assert bool(jnp.all(jnp.diff(kappa) > 0))
        grad = jax.grad(lambda r, m=kappa_map: models.kappa_from_raw(r, m).sum())(raw)
        assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.all(grad[1:] > 0))
    np.testing.assert_allclose(models.kappa_from_raw(jnp.array(0.0)), np.log(2.0) + 1.0, rtol=1e-6)


def _tiny_setup(kappa=True, dtype=jnp.float32):
    """A tiny SiameseNet, its variables and 4 views (2 of 12 px, 2 of 8 px) in `dtype` (float64:
    call inside jax.enable_x64)."""
    net = models.SiameseNet(kappa=kappa, stem="cifar", **TINY)
    views = [_normal((4, size, size, 3), seed=seed) for seed, size in enumerate((12, 12, 8, 8))]
    variables = _random_variables(net, views[0].shape)
    if dtype == jnp.float64:
        net, variables, views = float64.model(net), float64.tree(variables), float64.tree(views)
    return net, variables, views


# Grouped vs sequential passes, shared vs per-device statistics: float64 programs of the same math
# differ by roundoff; BatchNorm over 4 images amplifies it (~1e3 eps: 1e-4 in float32), which in
# float64 is ~2e-13, so 1e-10 (absolute 1e-12 for values near 0) has a 500x margin.
def _assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _slices(outputs, size):
    return [jax.tree.map(lambda a, s=s: a[s:s + size], out) for out in outputs
            for s in (0, size)]


def test_forward_views_separate_equals_one_pass_per_view():
    """bn_views="separate" (default): the same outputs and running averages as four forward
    passes, one per view, each with its own BN statistics (SimSiam's code)."""
    with jax.enable_x64(True):
        net, variables, views = _tiny_setup(dtype=jnp.float64)
        outs, state = _run(net, variables, views, True, models.SiameseNet.forward_views)
        assert len(outs) == 4
        refs, stats = [], {"batch_stats": variables["batch_stats"]}
        for view in views:
            ref, stats = _run(net, {"params": variables["params"], **stats}, view, True)
            refs.append(ref)
        for out, ref in zip(outs, refs):
            _assert_trees_close(out, ref)
        _assert_trees_close(state, stats)
        targets, _ = _run(net, variables, views[:2], True, models.SiameseNet.forward_views,
                          predict=False)
        assert targets[1].mu is None and targets[1].z.dtype == jnp.float64
        _assert_trees_close(targets[1].z, refs[1].z)
        # In eval mode the grouping does not matter.
        evals = _run(net, variables, views, False, models.SiameseNet.forward_views)
        alone = _run(net, variables, views[2], False)
        _assert_trees_close(evals[2].mu, alone.mu)


def test_forward_views_joint_shares_statistics_per_size():
    """bn_views="joint": one pass per crop size on the concatenated views (SwAV/DINO)."""
    with jax.enable_x64(True):
        net, variables, views = _tiny_setup(dtype=jnp.float64)
        joint = net.clone(bn_views="joint")
        outs, state = _run(joint, variables, views, True, models.SiameseNet.forward_views)
        ref_global, st = _run(net, variables, jnp.concatenate(views[:2]), True)
        ref_local, st = _run(net, {"params": variables["params"], **st},
                             jnp.concatenate(views[2:]), True)
        for out, ref in zip(outs, _slices((ref_global, ref_local), 4)):
            _assert_trees_close(out, ref)
        _assert_trees_close(state, st)
        separate, _ = _run(net, variables, views, True, models.SiameseNet.forward_views)
    assert not np.allclose(outs[1].z, separate[1].z, atol=1e-3)
    with pytest.raises(ValueError, match="bn_views"):
        _run(net.clone(bn_views="shared"), variables, views, True,
             models.SiameseNet.forward_views)


def test_batch_norm_matches_torch_formulas():
    """Per-view statistics and PyTorch's running averages, written out: normalisation with the
    biased variance, running variance updated with the unbiased one, once per view in order."""
    x = _normal((6, 3, 3, 5), seed=3) * 2.0 + 1.0
    bn = models.BatchNorm(use_running_average=False, views=2)
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    x64 = np.asarray(x, np.float64)
    mean, var = np.zeros(5), np.ones(5)
    for rows in (slice(0, 3), slice(3, 6)):
        flat = x64[rows].reshape(-1, 5)
        m, v = flat.mean(0), flat.var(0)
        np.testing.assert_allclose(y[rows], (x64[rows] - m) / np.sqrt(v + 1e-5), rtol=1e-4,
                                   atol=1e-5)
        mean = 0.9 * mean + 0.1 * m
        var = 0.9 * var + 0.1 * flat.var(0, ddof=1)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], var, rtol=1e-5)
    with pytest.raises(ValueError, match="does not split into 4 views"):
        models.BatchNorm(use_running_average=False, views=4).apply(variables, x,
                                                                  mutable=["batch_stats"])


def test_batch_norm_statistics_shared_across_devices():
    """Under pmap with axis_name, training-mode outputs equal those of one device holding the
    whole batch; parameter trees do not depend on the device count."""
    n = jax.local_device_count()
    assert n == 8, "tests/conftest.py sets 8 CPU devices"
    single = models.SiameseNet(kappa=True, stem="cifar", **TINY)
    multi = models.SiameseNet(kappa=True, stem="cifar", axis_name="batch", **TINY)
    multi_shapes = jax.tree.map(lambda a: a.shape, _shape_init(multi, (2, 8, 8, 3)))
    x = _normal((2 * n, 8, 8, 3), seed=5)
    variables = _random_variables(single, x.shape)
    assert jax.tree.map(lambda a: a.shape, variables) == multi_shapes
    with jax.enable_x64(True):
        single, multi = float64.model(single), float64.model(multi)
        x, variables = float64.tree(x), float64.tree(variables)
        ref, ref_state = _run(single, variables, x, True)

        @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0))
        def step(v, xs):
            return multi.apply(v, xs, train=True, mutable=["batch_stats"])

        out, state = step(variables, x.reshape(n, 2, 8, 8, 3))
        _assert_trees_close(out.z.reshape(2 * n, -1), ref.z)
        _assert_trees_close(out.kappa.reshape(-1), ref.kappa)
        _assert_trees_close(jax.tree.map(lambda a: a[0], state), ref_state)

        # Two views per device shard (view 0 then view 1): per-view statistics over all devices.
        views = [x, float64.tree(_normal((2 * n, 8, 8, 3), seed=6))]
        ref_views, ref_state = _run(single, variables, views, True,
                                    models.SiameseNet.forward_views)

        @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0))
        def views_step(v, xs):
            return multi.apply(v, list(xs), True, method=models.SiameseNet.forward_views,
                               mutable=["batch_stats"])

        outs, state = views_step(variables,
                                 jnp.stack([a.reshape(n, 2, 8, 8, 3) for a in views], 1))
        for out, ref in zip(outs, ref_views):
            _assert_trees_close(out.z.reshape(2 * n, -1), ref.z)
        _assert_trees_close(jax.tree.map(lambda a: a[0], state), ref_state)


def test_ema_update():
    target = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
    online = {"a": jnp.array([3.0, 6.0]), "b": {"c": jnp.array(-1.0)}}
    mixed = models.ema_update(target, online, 0.75)
    np.testing.assert_allclose(mixed["a"], [1.5, 3.0])
    np.testing.assert_allclose(mixed["b"]["c"], 2.0)
    for decay, expected in ((1.0, target), (0.0, online)):
        updated = models.ema_update(target, online, decay)
        for a, b in zip(jax.tree.leaves(updated), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)


def test_target_projections():
    with jax.enable_x64(True):
        net, variables, views = _tiny_setup(dtype=jnp.float64)
        global_views = views[:2]

        @functools.partial(jax.jit, static_argnums=1)
        def targets(params, target, target_params):
            outs, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                global_views, True, method=models.SiameseNet.forward_views,
                                mutable=["batch_stats"])
            tv = {"params": target_params, "batch_stats": variables["batch_stats"]}
            return models.target_projections(net, outs, global_views, True, target, tv), outs

        params = variables["params"]
        stop, outs = targets(params, "stopgrad", params)
        ema, _ = targets(params, "ema", params)
        assert len(stop) == len(ema) == 2
        for a, b, out in zip(stop, ema, outs):  # EMA copy equal to the online network: same z
            np.testing.assert_array_equal(a, out.z)
            _assert_trees_close(a, b)
        other = jax.tree.map(lambda a: a + 0.1 * float64.tree(_normal(a.shape, seed=9)), params)
        moved, _ = targets(params, "ema", other)
        assert not np.allclose(moved[0], stop[0], atol=1e-3)
        with pytest.raises(ValueError, match="target"):
            targets(params, "momentum", params)
        with pytest.raises(ValueError, match="target_variables"):
            models.target_projections(net, outs, global_views, True, "ema")


def test_end_to_end_multicrop_gradients():
    """VI-SimSiam loss on a 4-view multi-crop batch (2 global, 2 local views): finite loss and
    diagnostics, and gradients reach every parameter group."""
    net, variables, views = _tiny_setup()

    def loss_fn(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        outs, _ = net.apply(v, views, True, method=models.SiameseNet.forward_views,
                            mutable=["batch_stats"])
        targets = models.target_projections(net, outs, views[:2], True)
        return methods.get("vi_simsiam").loss_of(outs, targets)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert np.isfinite(float(loss)) and all(np.isfinite(float(m)) for m in metrics.values())
    for group in ("backbone", "projector", "predictor"):
        assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads[group]))) > 0
