"""The pretraining step at the paper's shapes in float32 and bfloat16 (`config.half_precision`)
on the first device JAX finds: images/s, compile time and memory, one JSON line per case.

    python -m benchmarks.accelerator_step                   # batch 64 and 256, both precisions
    python -m benchmarks.accelerator_step --config=experiments/configs/cpu_demo.py \\
        --batch_sizes=64                                    # the demo config's step, on a CPU

The config (default experiments/configs/paper.py: ResNet-18, 2 x 128 px + 4 x 64 px crops,
2048-d projector and predictor outputs, VI-SimSiam) is timed with `benchmarks.compiled_step`
on synthetic uint8 160 px source images, the views made inside the step as in pretraining; its
batch size and precision are set per case. Each case runs in a fresh process, so that
`device_peak_mib` (the device's allocator peak; None on XLA:CPU) is that case's alone. `step_s` is the median of --steps timed steps after --warmup untimed ones;
`images_per_sec` counts source images (each seen in every view).

Needs jax, flax, optax, dm-pix and ml_collections, not tensorflow: on an accelerator image
without dm-pix or ml_collections, carry their wheels (pure Python; benchmarks/README.md, "GPU").
"""

from vi_simsiam_jax import launch

CPU_SETUP = launch.configure(__name__)  # first: may restart; XLA reads its flags once

import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import compiled_step  # noqa: E402
from vi_simsiam_jax import train_state  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                           "paper.py"), "Pretraining config to time.", lock_config=False)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["64", "256"], "Global batch sizes to time.")
_PRECISIONS = flags.DEFINE_list("precisions", list(PRECISIONS), "Subset of float32, bfloat16.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per case.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after the first, per case.")
_CASE = flags.DEFINE_string("case", "", "Internal: 'batch_size,precision' of the one case this "
                            "process runs.")


def run_case(batch_size: int, precision: str) -> dict:
    config = _CONFIG.value
    config.batch_size = batch_size
    config.half_precision = precision == "bfloat16"
    step = compiled_step.CompiledStep(config, train_state.make_model(config, axis_name=None))
    first_step_s = step.first_step()
    step.time_steps(_WARMUP.value)
    times, loss = step.time_steps(_STEPS.value)
    step_s = statistics.median(times)
    return {"method": config.method, "precision": precision, "batch_size": batch_size,
            "view_sizes": [v[1] for v in train_state.view_shapes(config, batch_size)],
            "dim": config.model.dim, "backend": jax.default_backend(),
            "device": jax.local_devices()[0].device_kind, "jax_version": jax.__version__,
            "compile_s": round(step.compile_s, 2), "first_step_s": round(first_step_s, 2),
            "step_s": round(step_s, 5), "images_per_sec": round(batch_size / step_s, 1),
            "loss": round(loss, 4), **step.memory_mib(),
            "step_s_all": [round(t, 5) for t in times]}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CASE.value:
        batch_size, precision = _CASE.value.split(",")
        print(json.dumps(run_case(int(batch_size), precision)), flush=True)
        return
    unknown = set(_PRECISIONS.value) - set(PRECISIONS)
    if unknown:
        raise app.UsageError(f"--precisions must be among {PRECISIONS}, got {sorted(unknown)}.")
    for batch_size in _BATCH_SIZES.value:
        for precision in _PRECISIONS.value:
            completed = subprocess.run(
                [sys.executable, "-m", "benchmarks.accelerator_step", *sys.argv[1:],
                 f"--case={int(batch_size)},{precision}"], capture_output=True, text=True)
            if completed.returncode:
                sys.exit(f"Case batch {batch_size}, {precision} failed:\n"
                         f"{completed.stderr[-3000:]}")
            print(completed.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    app.run(main)
