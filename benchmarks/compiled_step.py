"""The compiled pretraining step on one device with synthetic inputs: what the step benchmarks
time. Imports neither tensorflow nor the input pipeline, so it runs on an accelerator host that
has only jax, flax, optax, dm-pix and ml_collections."""

import time

import jax
import ml_collections
import numpy as np

from vi_simsiam_jax import models, train, train_state

STEPS_PER_EPOCH = 1000  # the cosine schedule's length; it does not change the step's cost
SOURCE_SIZE = 160  # side of the synthetic source images (ImageNette/ImageWoof 160 px)


class CompiledStep:
    """`train.make_p_train_step` for `config` and `model` on the first local device (state
    donated), compiled ahead of the first call (`lowered` stays usable until then).

    augment_views=True: the pretraining step, fed uint8 SOURCE_SIZE px source images (the
    views are made inside it); False: the step on ready float32 views."""

    def __init__(self, config: ml_collections.ConfigDict, model: models.SiameseNet, *,
                 augment_views: bool = True):
        device = jax.local_devices()[0]
        state = train_state.create_train_state(jax.random.key(0), config, model)
        self.state = jax.device_put(jax.tree.map(lambda x: np.asarray(x)[None], state), device)
        self.inputs = jax.device_put(synthetic_inputs(config, augment_views), device)
        self.keys = jax.random.split(jax.random.key(1), 1)
        self.hyper = train_state.hyperparameters(config, STEPS_PER_EPOCH)
        # The pretraining loop's pmapped step; its inputs' leading axis of 1 puts it on `device`.
        self.lowered = train.make_p_train_step(model, config, augment_views=augment_views).lower(
            self.state, self.inputs, self.keys, self.hyper)
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
        self.state, metrics = self.compiled(self.state, self.inputs, self.keys, self.hyper)
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


def synthetic_inputs(config: ml_collections.ConfigDict, augment_views: bool):
    """One device's step input, leading axis 1: a batch of random uint8 source images, or
    random float32 views."""
    rng = np.random.default_rng(0)
    batch = config.batch_size
    if not augment_views:
        return [rng.standard_normal((1,) + shape, dtype=np.float32)
                for shape in train_state.view_shapes(config, batch)]
    return {"image": rng.integers(0, 256, (1, batch, SOURCE_SIZE, SOURCE_SIZE, 3), np.uint8),
            "size": np.full((1, batch, 2), SOURCE_SIZE, np.int32),
            "position": np.arange(batch, dtype=np.int32)[None]}
