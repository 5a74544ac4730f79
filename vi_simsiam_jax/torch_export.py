"""A pretraining checkpoint as a PyTorch state_dict in safetensors (written with numpy: the export
needs no torch).

Names: the backbone under torchvision `resnet18`'s state_dict names (`conv1.weight`,
`layer1.0.bn2.running_var`, `layer2.0.downsample.0.weight`, ...; no `fc.*`), the heads under the
module names of the PyTorch reference (`../shared/bench/torch_reference.py`, SimSiam's builder):
`projector.{0,3,6}` Linear, `projector.{1,4}` BatchNorm1d, `projector.7` BatchNorm1d(affine=False),
`predictor.0` Linear, `predictor.1` BatchNorm1d, `predictor.3` Linear (with bias; with kappa,
as VI-SimSiam's, it has dim + 1 outputs, the last the raw kappa). Conv kernels go HWIO -> OIHW,
dense kernels (in, out) -> (out, in); BatchNorm's num_batches_tracked is the checkpoint step
(PyTorch reads it only when momentum is None).

    backbone = torchvision.models.resnet18()
    state = safetensors.torch.load_file(path)
    missing, unexpected = backbone.load_state_dict(state, strict=False)  # missing: fc.*

A checkpoint with the "cifar" stem has a 3x3 conv1 and no max-pool: set
`backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)` and `backbone.maxpool = nn.Identity()`
before loading. The file's metadata records the stem, width, method, kappa ("true": the
predictor's last output is the raw kappa) and step.
"""

import re
from typing import Any

import numpy as np
import safetensors.numpy
from flax import traverse_util

from vi_simsiam_jax import files

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_HEAD_MODULES = {  # flax (module, layer) -> reference index in the nn.Sequential
    "projector": {"fc1": "0", "bn1": "1", "fc2": "3", "bn2": "4", "fc3": "6", "bn3": "7"},
    "predictor": {"fc1": "0", "bn1": "1", "fc2": "3"},
}


def _backbone_name(path: tuple[str, ...]) -> str:
    """('layer2_0', 'downsample_conv') -> 'layer2.0.downsample.0' (without the leaf)."""
    parts = []
    for part in path:
        parts.append(re.sub(r"^(layer\d)_(\d)$", r"\1.\2", part)
                     .replace("downsample_conv", "downsample.0")
                     .replace("downsample_bn", "downsample.1"))
    return ".".join(parts)


def _module_name(path: tuple[str, ...]) -> str:
    if path[0] == "backbone":
        return _backbone_name(path[1:])
    if path[0] in _HEAD_MODULES and len(path) == 2:
        return f"{path[0]}.{_HEAD_MODULES[path[0]][path[1]]}"
    raise ValueError(f"No PyTorch name for parameter {'/'.join(path)}.")


def torch_state_dict(variables: dict[str, Any], step: int, dtype: Any = np.float32
                     ) -> dict[str, np.ndarray]:
    """{"params", "batch_stats"} of a SiameseNet -> PyTorch state_dict arrays (`dtype`, int64
    num_batches_tracked), named as in the module docstring."""
    state = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(variables[collection])
        for path, value in flat.items():
            module, leaf = _module_name(path[:-1]), path[-1]
            value = np.asarray(value, dtype)
            if leaf == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
                state[f"{module}.weight"] = value
            elif leaf == "bias" and path[-2].startswith("fc"):
                state[f"{module}.bias"] = value
            elif leaf in _BN:
                state[f"{module}.{_BN[leaf]}"] = value
                if leaf == "mean":
                    state[f"{module}.num_batches_tracked"] = np.array(step, np.int64)
            else:
                raise ValueError(f"No PyTorch name for parameter {'/'.join(path)}.")
    return {name: np.require(value, requirements='C') for name, value in sorted(state.items())}


def save(path: str, state: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Writes `state` to a .safetensors file, whole or not at all."""
    with files.replaced_on_success(path) as temporary:
        safetensors.numpy.save_file(state, temporary, metadata=metadata)
