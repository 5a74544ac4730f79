"""Exports a pretraining checkpoint to PyTorch: one .safetensors file with the backbone under
torchvision resnet18's names and the heads under the PyTorch reference's (see
vi_simsiam_jax/torch_export.py for the names and how to load it).

    python -m experiments.export_torch --workdir=runs/demo --out=runs/demo/resnet18.safetensors
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json
import os

from absl import app, flags

from vi_simsiam_jax import methods, run_config, torch_export, train_state
from vi_simsiam_jax.evaluation import encoder

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (config.json, checkpoints).")
_OUT = flags.DEFINE_string("out", None, "Output .safetensors file.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = run_config.load_config(_WORKDIR.value)
    model = train_state.make_model(config, axis_name=None)
    variables, step = encoder.restore_encoder(_WORKDIR.value, config, model, _STEP.value)
    state = torch_export.torch_state_dict(variables, step)
    metadata = {"format": "pt", "method": config.method,
                "kappa": str(methods.get(config.method).kappa).lower(),
                "stem": config.model.stem, "width": str(config.model.width), "step": str(step)}
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    torch_export.save(_OUT.value, state, metadata)
    print(json.dumps({"out": _OUT.value, "tensors": len(state), **metadata}))


if __name__ == "__main__":
    app.run(main)
