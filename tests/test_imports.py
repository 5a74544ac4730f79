"""The library's mathematics and training step import and run without tensorflow (an accelerator
host may have only jax, flax and optax); evaluation does not import training."""

import subprocess
import sys

from tests import pretrain_utils

_WITHOUT_TENSORFLOW = """
import importlib.abc, sys

class NoTensorflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"{name} is unimportable in this test")

sys.meta_path.insert(0, NoTensorflow())
import vi_simsiam_jax.train, vi_simsiam_jax.train_state, vi_simsiam_jax.models
import vi_simsiam_jax.losses, vi_simsiam_jax.power_spherical
import jax, numpy as np
from tests import tiny_config
from vi_simsiam_jax import train, train_state
config = tiny_config.get_config()
config.conv = "auto"  # the CPU plans, as a CPU machine trains
model = train_state.make_model(config)
state = train_state.abstract_train_state(config, model)
state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype), state)
views = [jax.ShapeDtypeStruct((1,) + s, np.float32) for s in train_state.view_shapes(config, 4)]
keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(1), 1))
_, metrics = jax.eval_shape(train.make_p_train_step(model, config, 4), state, views, keys)
assert "tensorflow" not in sys.modules
print(sorted(metrics))
"""


def test_training_step_traces_without_tensorflow():
    """Imports, then traces the whole pmapped step (every line of its Python runs; compiling
    would add nothing here)."""
    completed = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW],
                               cwd=pretrain_utils.REPO, capture_output=True, text=True,
                               timeout=300, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "'kappa_mean'" in completed.stdout and "'loss'" in completed.stdout


def test_evaluation_does_not_import_training():
    code = ("import sys; import vi_simsiam_jax.evaluation.linear_probe, "
            "vi_simsiam_jax.evaluation.kappa_report, vi_simsiam_jax.evaluation.ood_report; "
            "print(sorted(m for m in sys.modules if m in ('vi_simsiam_jax.train', "
            "'vi_simsiam_jax.loop')))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=pretrain_utils.REPO,
                               capture_output=True, text=True, timeout=300, check=True)
    assert completed.stdout.strip() == "[]"
