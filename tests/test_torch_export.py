"""PyTorch export: torchvision resnet18's state_dict names and shapes, kernel layouts checked by
running the exported weights through OIHW convolutions, and the safetensors round trip (needs no
torch; tests/test_torch_parity.py runs the export in torchvision)."""

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from vi_simsiam_jax import models, torch_export


def _variables(model: models.SiameseNet, size: int = 32) -> dict:
    """Random variables of model's shapes (BatchNorm statistics included, all positive, so a
    mix-up of mean / var / scale / bias shows)."""
    shapes = jax.eval_shape(lambda key, x: model.init(key, x, False), jax.random.key(0),
                            jnp.zeros((2, size, size, 3)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.uniform(0.1, 0.5, s.shape).astype(s.dtype) / 4,
                        dict(shapes))


def _torchvision_resnet18_names() -> dict[str, tuple[int, ...]]:
    """torchvision.models.resnet18().state_dict() without fc, written out from its definition."""
    names = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        names.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,),
                      f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                      f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    cin = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            names[f"{p}.conv1.weight"] = (c, cin if block == 0 else c, 3, 3)
            bn(f"{p}.bn1", c)
            names[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if block == 0 and stage > 1:
                names[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                bn(f"{p}.downsample.1", c)
        cin = c
    return names


def test_backbone_names_and_shapes_are_torchvision_resnet18s():
    model = models.SiameseNet(kappa=True, dim=32, proj_hidden_dim=48, pred_dim=16)
    state = torch_export.torch_state_dict(_variables(model), step=7)
    heads = ("projector.", "predictor.")
    backbone = {k: v.shape for k, v in state.items() if not k.startswith(heads)}
    assert backbone == _torchvision_resnet18_names()
    assert {k: v.shape for k, v in state.items() if k.startswith(heads)} == {
        "projector.0.weight": (48, 512), "projector.3.weight": (48, 48),
        "projector.6.weight": (32, 48), "predictor.0.weight": (16, 32),
        "predictor.3.weight": (33, 16), "predictor.3.bias": (33,),
        **{f"projector.{i}.{n}": (48,) for i in (1, 4)
           for n in ("weight", "bias", "running_mean", "running_var")},
        **{f"projector.7.{n}": (32,) for n in ("running_mean", "running_var")},
        **{f"predictor.1.{n}": (16,) for n in ("weight", "bias", "running_mean", "running_var")},
        **{f"{m}.num_batches_tracked": () for m in ("projector.1", "projector.4", "projector.7",
                                                    "predictor.1")}}
    assert state["bn1.num_batches_tracked"] == 7
    assert state["bn1.num_batches_tracked"].dtype == np.int64


def test_kernel_layouts_compute_the_same_outputs():
    model = models.SiameseNet(stem="cifar", width=4, dim=8, proj_hidden_dim=8, pred_dim=4)
    variables = _variables(model)
    state = torch_export.torch_state_dict(variables, step=0)
    params = variables["params"]
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
    ours = jax.lax.conv_general_dilated(x, params["backbone"]["layer1_0"]["conv1"]["kernel"],
                                        (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    exported = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2), state["layer1.0.conv1.weight"], (1, 1), "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    np.testing.assert_allclose(ours, exported.transpose(0, 2, 3, 1), atol=1e-5)
    h = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    fc2 = params["predictor"]["fc2"]
    np.testing.assert_allclose(h @ np.asarray(fc2["kernel"]) + np.asarray(fc2["bias"]),
                               h @ state["predictor.3.weight"].T + state["predictor.3.bias"],
                               atol=1e-6)
    bn = variables["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]
    np.testing.assert_array_equal(state["layer2.0.downsample.1.running_var"], bn["var"])


def test_safetensors_round_trip(tmp_path):
    model = models.SiameseNet(kappa=True, stem="cifar", width=4, dim=8, proj_hidden_dim=8,
                              pred_dim=4)
    state = torch_export.torch_state_dict(_variables(model), step=3)
    path = str(tmp_path / "encoder.safetensors")
    torch_export.save(path, state, {"format": "pt", "step": "3"})
    loaded = safetensors.numpy.load_file(path)
    assert loaded.keys() == state.keys()
    for name in state:
        np.testing.assert_array_equal(loaded[name], state[name])
