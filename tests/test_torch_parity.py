"""Step-for-step parity with PyTorch (float64): torchvision's resnet18 loaded from our export
computes our features on real ImageNette images, and PyTorch SimSiam / VI-SimSiam (torchvision
resnet18 + the reference's heads, one forward pass per view, torch SGD, SimSiam's and Alg. 1's
losses; VI-BYOL with BYOL's cosine EMA target) trained for 10 steps from our initial weights on
our batches match `train.train_step`: per-step losses, final parameters and BN running averages."""

import copy
import math
import tarfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from experiments.configs import paper
from tests import float64, reference
from tests.torchvision_import import import_torchvision
from vi_simsiam_jax import datasets, train, train_state
from vi_simsiam_jax.torch_export import torch_state_dict


torchvision = import_torchvision()
torch.set_default_dtype(torch.float64)
STEPS = 10
BATCH = 6


def _imagenette_images(count: int, size: int) -> np.ndarray:
    """The first `count` training JPEGs of the real ImageNette archive, centre-cropped and
    resized to size x size, ImageNet-normalised: (count, size, size, 3) float64."""
    archive = datasets.default_archive_dir() / "imagenette2-160.tgz"
    if not archive.exists():
        pytest.fail(f"the real dataset is missing: {archive}")
    images = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if "/train/" in member.name and member.name.endswith(".JPEG"):
                image = Image.open(tar.extractfile(member)).convert("RGB")
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side)).resize((size, size))
                images.append(np.asarray(image, np.float64) / 255.0)
                if len(images) == count:
                    break
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return (np.stack(images) - mean) / std


def _config(method: str, learning_rate: float, target: str) -> ml_collections.ConfigDict:
    """Paper defaults (per-view BN, paper loss scale, BYOL's EMA schedule) on 2 global 32 px +
    2 local 16 px views and narrow heads; cosine decay over the STEPS steps. The EMA base decay
    is 0.5, so that the target moves visibly within STEPS steps."""
    config = paper.get_config(f"imagenette,{method}")
    config.target, config.ema_decay = target, 0.5
    config.global_size, config.local_crops, config.local_size = 32, 2, 16
    config.model.update(proj_hidden_dim=32, dim=16, pred_dim=8)
    config.num_epochs, config.learning_rate, config.weight_decay = 1, learning_rate, 1e-2
    return config


def _torch_model(config: ml_collections.ConfigDict, state: dict[str, np.ndarray]
                 ) -> torch.nn.ModuleDict:
    """torchvision resnet18 (fc removed) + the reference's projector and predictor, with our
    exported weights."""
    backbone = torchvision.models.resnet18(zero_init_residual=True)
    backbone.fc = torch.nn.Identity()
    hidden, dim, pred = config.model.proj_hidden_dim, config.model.dim, config.model.pred_dim
    nn = torch.nn
    projector = nn.Sequential(
        nn.Linear(512, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
    predictor = nn.Sequential(
        nn.Linear(dim, pred, bias=False), nn.BatchNorm1d(pred), nn.ReLU(),
        nn.Linear(pred, dim + (config.method == "vi_simsiam")))
    model = nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor})
    for name, module in model.items():
        prefix = _prefix(name)
        module.load_state_dict({k[len(prefix):]: torch.from_numpy(v.copy())
                                for k, v in state.items() if _prefix(k.split(".")[0]) == prefix},
                               strict=True)
    return model.train()


def _prefix(module: str) -> str:
    """The export's name prefix of a module: heads under their name, the backbone under none."""
    return f"{module}." if module in ("projector", "predictor") else ""


def _torch_loss(model, target_model, views, config):
    """One forward pass per view; the loss over the ordered pairs (i, j != i) with a global
    target j: SimSiam's mean of D over the pairs, VI-SimSiam's Alg. 1 / Eq. 12 sum of NLLs.
    Targets: the online projections, or target_model's (BYOL), gradient stopped."""
    outputs = []
    for view in views:
        z = model["projector"](model["backbone"](view))
        outputs.append((z, model["predictor"](z)))
    targets = [z for z, _ in outputs[:config.global_crops]]
    if target_model is not None:
        with torch.no_grad():
            targets = [target_model["projector"](target_model["backbone"](view))
                       for view in views[:config.global_crops]]
    dim, terms = config.model.dim, []
    for j in range(config.global_crops):
        target = F.normalize(targets[j].detach(), dim=-1)
        for i, (_, p) in enumerate(outputs):
            if i == j:
                continue
            mu = F.normalize(p[:, :dim], dim=-1)
            if config.method == "simsiam":
                terms.append(-(mu * target).sum(-1).mean())
            else:
                kappa = F.softplus(p[:, dim]) + 1.0
                log_prob = reference.power_spherical_log_prob(target, mu, kappa, torch.lgamma,
                                                              torch.log1p)
                terms.append(-log_prob.mean())
    total = sum(terms)
    return total / len(terms) if config.method == "simsiam" else total


def _batches(config: ml_collections.ConfigDict) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.normal(size=shape) for shape in train_state.view_shapes(config, BATCH)]
            for _ in range(STEPS)]


def _train_jax(config, batches):
    """STEPS steps of train.train_step in float64; initial and final variables, losses."""
    with jax.enable_x64(True):
        model = float64.model(train_state.make_model(config, axis_name=None))
        state = train_state.create_train_state(jax.random.key(config.seed), config, model)
        initial = {"params": state.params, "batch_stats": state.batch_stats}
        step = jax.jit(train.configured_train_step(model, config, STEPS))
        step_losses = []
        for batch in batches:
            state, metrics = step(state, [jnp.asarray(v) for v in batch], jax.random.key(0))
            assert metrics["finite"] == 1.0
            step_losses.append(float(metrics["loss"]))
        final = {"params": state.params, "batch_stats": state.batch_stats}
        return (torch_state_dict(initial, 0, np.float64),
                torch_state_dict(final, STEPS, np.float64), step_losses)


def _train_torch(config, initial, batches):
    """The same STEPS steps in PyTorch: SGD (momentum, coupled weight decay), cosine lr; for
    BYOL a target copy (batch statistics, running averages frozen: momentum 0) moved after
    every step by tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2, parameters and averages."""
    model = _torch_model(config, initial)
    target_model = None
    if config.target == "ema":
        target_model = torch.nn.ModuleDict({k: copy.deepcopy(model[k])
                                            for k in ("backbone", "projector")})
        for module in target_model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    step_losses = []
    for k, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * k / STEPS))
        views = [torch.from_numpy(v.transpose(0, 3, 1, 2)) for v in batch]
        loss = _torch_loss(model, target_model, views, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_losses.append(loss.item())
        if target_model is not None:
            tau = 1 - (1 - config.ema_decay) * (math.cos(math.pi * k / STEPS) + 1) / 2
            with torch.no_grad():
                for name, module in target_model.items():
                    online = model[name].state_dict()
                    for key, value in module.state_dict().items():
                        if value.is_floating_point():
                            value.mul_(tau).add_((1 - tau) * online[key])
    return model, step_losses


def _torch_state(model: torch.nn.ModuleDict) -> dict[str, np.ndarray]:
    return {_prefix(name) + k: v.numpy() for name, module in model.items()
            for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method,learning_rate,target", [
    ("simsiam", 0.5, "stopgrad"), ("vi_simsiam", 0.05, "ema")])  # VI-SimSiam = VI loss + stopgrad
def test_ten_steps_match_pytorch(method, learning_rate, target):
    config = _config(method, learning_rate, target)
    batches = _batches(config)
    initial, final, losses = _train_jax(config, batches)
    model, torch_losses = _train_torch(config, initial, batches)
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-9, atol=1e-11)
    theirs = _torch_state(model)
    assert theirs.keys() == final.keys()
    moved = max(np.max(np.abs(final[k] - initial[k])) for k in final if "weight" in k)
    assert moved > 1e-2, "the learning rate must move the parameters"
    for name in final:
        if not name.endswith("num_batches_tracked"):  # ours: steps; PyTorch's: passes
            np.testing.assert_allclose(final[name], theirs[name], rtol=1e-8, atol=1e-10,
                                       err_msg=name)


def test_torchvision_resnet18_loads_the_export_and_gives_our_features():
    """Our encoder and torchvision's resnet18 with the exported weights (strict=False: only
    fc.* missing) agree on real ImageNette images. In float64: the two programs sum in other
    orders, ~1e3 eps64 ~ 2e-13 of the features through 20 layers (float32: 1e-4), asked 1e-10."""
    config = paper.get_config("imagenette,vi_simsiam")
    model = train_state.make_model(config, axis_name=None)
    variables = jax.jit(lambda key, x: model.init(key, x, False))(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    # Non-trivial BN statistics and a non-zero residual branch, as after training.
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: np.asarray(a, np.float64) * rng.uniform(0.5, 1.5, a.shape)
        + rng.uniform(0.0, 0.1, a.shape) if path[-1].key in ("scale", "bias", "mean", "var")
        else np.asarray(a, np.float64), variables)
    images = _imagenette_images(8, 64)
    with jax.enable_x64(True):
        ours = np.asarray(float64.model(model).apply(float64.tree(variables), jnp.asarray(images),
                                                     False, predict=False).features)
    resnet = torchvision.models.resnet18()
    state = torch_state_dict(variables, 0, np.float64)
    missing, unexpected = resnet.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    assert unexpected and all(k.startswith(("projector.", "predictor.")) for k in unexpected)
    resnet.fc = torch.nn.Identity()
    resnet = resnet.double().eval()
    with torch.no_grad():
        theirs = resnet(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert ours.dtype == theirs.dtype == np.float64 and np.std(ours) > 0.1
    np.testing.assert_allclose(theirs, ours, rtol=1e-10, atol=1e-10)
