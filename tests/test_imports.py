"""The library's mathematics and training step import and run without tensorflow (an accelerator
host may have only jax, flax and optax); evaluation imports neither training nor plotting."""

import ast
import json
import math
import subprocess
import sys

from tests import pretrain_utils

# sitecustomize.py of a process (and of the processes it starts) that cannot import tensorflow.
_NO_TENSORFLOW = """
import importlib.abc, sys

class NoTensorflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"{name} is unimportable in this test")

sys.meta_path.insert(0, NoTensorflow())
"""


def test_step_benchmark_runs_without_tensorflow(tmp_path):
    """benchmarks.accelerator_step, as an accelerator host without tensorflow runs it, dry-run
    on the tiny config in bfloat16 (float32 is the path every other step test runs): model,
    losses, Power Spherical and the compiled step, one JSON line per case."""
    (tmp_path / "sitecustomize.py").write_text(_NO_TENSORFLOW)
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path),
           **{name: pretrain_utils.ENV[name] for name in ("XLA_FLAGS",
                                                          "JAX_COMPILATION_CACHE_DIR")}}
    command = [sys.executable, "-m", "benchmarks.accelerator_step",
               f"--config={pretrain_utils.REPO / 'tests' / 'tiny_config.py'}",
               "--batch_sizes=4", "--precisions=bfloat16", "--steps=2", "--warmup=1"]
    completed = subprocess.run(command, cwd=pretrain_utils.REPO, capture_output=True, text=True,
                               timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    cases = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [(c["batch_size"], c["precision"]) for c in cases] == [(4, "bfloat16")]
    for case in cases:
        assert case["view_sizes"] == [16, 16, 8] and math.isfinite(case["loss"])
        assert case["images_per_sec"] > 0 and case["xla_step_mib"] > 0
        assert case["device_peak_mib"] is None  # XLA:CPU keeps no allocator statistics


_EVALUATION = sorted((pretrain_utils.REPO / "vi_simsiam_jax" / "evaluation").glob("*.py"))


def _imported(path) -> set[str]:
    """The top-level names of the modules a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_evaluation_imports_neither_training_nor_plotting():
    """No module of vi_simsiam_jax/evaluation imports matplotlib, the loop or the step, directly
    (read from its source) or through what it imports (the modules loaded with all of them)."""
    assert len(_EVALUATION) >= 8
    for path in _EVALUATION:
        imported = _imported(path)
        assert not {n for n in imported if n.split(".")[0] == "matplotlib"}, path.name
        assert not {n for n in imported if n.startswith(("vi_simsiam_jax.loop",
                                                         "vi_simsiam_jax.train."))
                    or n in ("vi_simsiam_jax.loop", "vi_simsiam_jax.train")}, path.name
    modules = ", ".join(f"vi_simsiam_jax.evaluation.{p.stem}" for p in _EVALUATION
                        if p.stem != "__init__")
    code = (f"import sys; import {modules}; "
            "print(sorted(m for m in sys.modules if m in ('vi_simsiam_jax.train', "
            "'vi_simsiam_jax.loop')))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=pretrain_utils.REPO,
                               capture_output=True, text=True, timeout=300, check=True)
    assert completed.stdout.strip() == "[]"
