"""The compiled pretraining step on one device with synthetic views: what the step benchmarks
time. Imports neither tensorflow nor the input pipeline, so it runs on an accelerator host that
has only jax, flax, optax and ml_collections."""

import time

import jax
import ml_collections
import numpy as np

from vi_simsiam_jax import models, train, train_state

STEPS_PER_EPOCH = 1000  # the cosine schedule's length; it does not change the step's cost


class CompiledStep:
    """`train.make_p_train_step` for `config` and `model` on the first local device (state
    donated), compiled ahead of the first call (`lowered` stays usable until then)."""

    def __init__(self, config: ml_collections.ConfigDict, model: models.SiameseNet):
        device = jax.local_devices()[0]
        state = train_state.create_train_state(jax.random.key(0), config, model,
                                               STEPS_PER_EPOCH)
        self.state = jax.device_put(jax.tree.map(lambda x: np.asarray(x)[None], state), device)
        rng = np.random.default_rng(0)
        self.views = [jax.device_put(rng.standard_normal((1,) + shape, dtype=np.float32), device)
                      for shape in train_state.view_shapes(config, config.batch_size)]
        self.keys = jax.random.split(jax.random.key(1), 1)
        # The pretraining loop's pmapped step; its inputs' leading axis of 1 puts it on `device`.
        self.lowered = train.make_p_train_step(model, config, STEPS_PER_EPOCH).lower(
            self.state, self.views, self.keys)
        start = time.perf_counter()
        self.compiled = self.lowered.compile()
        self.compile_s = time.perf_counter() - start

    def first_step(self) -> float:
        """Runs the first step (the state's buffers are donated from here on); returns its
        seconds with the compilation's."""
        start = time.perf_counter()
        self.step()
        return self.compile_s + time.perf_counter() - start

    def step(self) -> dict[str, jax.Array]:
        self.state, metrics = self.compiled(self.state, self.views, self.keys)
        jax.block_until_ready(metrics)
        return metrics

    def time_steps(self, steps: int) -> tuple[list[float], float]:
        """Seconds of each of `steps` steps, and the last loss (NaN for no step)."""
        times, metrics = [], {"loss": [float("nan")]}
        for _ in range(steps):
            start = time.perf_counter()
            metrics = self.step()
            times.append(time.perf_counter() - start)
        return times, float(metrics["loss"][0])

    def memory_mib(self) -> dict[str, float | None]:
        """XLA's buffers for the step (arguments + outputs + temporaries - donated aliases) and
        the device's peak so far (None where the backend keeps no statistics, as XLA:CPU)."""
        analysis = self.compiled.memory_analysis()
        step_bytes = None
        if analysis is not None:
            step_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                          + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
        stats = jax.local_devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return {"xla_step_mib": None if step_bytes is None else round(step_bytes / 2**20, 1),
                "xla_temp_mib": None if analysis is None else round(
                    analysis.temp_size_in_bytes / 2**20, 1),
                "device_peak_mib": None if peak is None else round(peak / 2**20, 1)}
