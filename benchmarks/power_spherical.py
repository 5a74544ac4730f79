"""Throughput of jitted Power Spherical log_prob + gradient and sampling, JAX vs PyTorch.

    python -m benchmarks.power_spherical --batch=512 --dim=2048

Prints one JSON line: rows/s of log_prob with its gradient w.r.t. mu and kappa, and of sampling.
When PyTorch's `power_spherical` package is importable here, or in the interpreter given by
--torch_python (default: $TORCH_PYTHON, else /tmp/torchref/bin/python if it exists), the same two
figures for it are measured in the same run, with the ratios JAX / PyTorch.
"""

import importlib.util
import json
import os
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import peer
from vi_simsiam_jax import power_spherical as ps

flags.DEFINE_integer("batch", 512, "Rows (distributions) per call.")
flags.DEFINE_integer("dim", 2048, "Dimension d of the sphere S^{d-1}.")
flags.DEFINE_float("kappa", 10.0, "Concentration of every row.")
flags.DEFINE_integer("repeats", 50, "Timed calls per figure (the median is reported).")
flags.DEFINE_string("torch_python", os.environ.get("TORCH_PYTHON", "/tmp/torchref/bin/python"),
                    "Interpreter with torch + power-spherical, used when they are not importable "
                    "here; empty to skip the PyTorch figures.")
FLAGS = flags.FLAGS

_TORCH_SCRIPT = pathlib.Path(__file__).with_name("torch_power_spherical.py")


def _rows_per_sec(fn: Callable[[], jax.Array], rows: int, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return rows / sorted(times)[len(times) // 2]


def jax_figures(batch: int, dim: int, kappa: float, repeats: int) -> dict[str, float]:
    key_mu, key_x, key_sample = jax.random.split(jax.random.key(0), 3)
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    mu = unit(jax.random.normal(key_mu, (batch, dim)))
    x = unit(jax.random.normal(key_x, (batch, dim)))
    kappas = jnp.full((batch,), kappa)
    log_prob_grad = jax.jit(jax.value_and_grad(
        lambda mu, kappa: jnp.sum(ps.log_prob(x, mu, kappa)), argnums=(0, 1)))
    sample = jax.jit(ps.sample)
    return {
        "log_prob_grad_per_sec": _rows_per_sec(lambda: log_prob_grad(mu, kappas), batch, repeats),
        "sample_per_sec": _rows_per_sec(lambda: sample(key_sample, mu, kappas), batch, repeats),
    }


def torch_figures(batch: int, dim: int, kappa: float, repeats: int) -> dict | None:
    args = dict(batch=batch, dim=dim, kappa=kappa, repeats=repeats)
    if importlib.util.find_spec("torch") and importlib.util.find_spec("power_spherical"):
        from benchmarks import torch_power_spherical
        return torch_power_spherical.measure(**args)
    if not FLAGS.torch_python or not os.path.exists(FLAGS.torch_python):
        return None
    # -P: keep benchmarks/ off sys.path, where power_spherical.py would shadow the package.
    command = [FLAGS.torch_python, "-P", str(_TORCH_SCRIPT)]
    command += [f"--{k}={v}" for k, v in args.items()]
    return peer.run_json(command)


def main(argv: list[str]) -> None:
    del argv
    config = dict(batch=FLAGS.batch, dim=FLAGS.dim, kappa=FLAGS.kappa, repeats=FLAGS.repeats)
    figures = {**config, "backend": jax.default_backend(), "jax_version": jax.__version__,
               **jax_figures(**config)}
    reference = torch_figures(**config)
    if reference:
        figures.update(reference)
        for name in ("log_prob_grad_per_sec", "sample_per_sec"):
            figures[f"ratio_{name}"] = figures[name] / reference[f"torch_{name}"]
    print(json.dumps(figures))


if __name__ == "__main__":
    app.run(main)
