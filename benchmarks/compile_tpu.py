"""The paper's pretraining step, the linear probe's training step and feature extraction, compiled
for a TPU topology on a CPU host, without a TPU: per-chip memory against the chip's HBM, XLA's
FLOP count, and the bounds that follow. One JSON file per case.

    make compile-tpu    # a venv with jax[tpu] (libtpu), then the default topologies below
    JAX_PLATFORMS=cpu .venv-tpu/bin/python -m benchmarks.compile_tpu --topologies=v5e:2x4 \\
        --precisions=bfloat16 --batch_sizes=64,256 --output_dir=results/tpu_compile

Each step is built as on a TPU host: the pretraining step is `train.make_p_train_step` of the
paper config (`experiments/configs/paper.py:imagenette,vi_simsiam`: views made inside the step
from uint8 160 px source images, per-view BatchNorm synchronised across the chips) pmapped over
the topology's devices, with `conv="xla"` (what "auto" picks on a TPU); the probe's step is
`linear_probe.head_train_step` on one chip; feature extraction is `encoder.encode` with the
batch split over every chip, as `encoder.extract_features` does. Inputs are abstract
(`jax.ShapeDtypeStruct` of the real shapes): no dataset and no TPU are needed, only libtpu's
compiler (`jax.experimental.topologies`).

Topologies are libtpu's names (`v5e:2x4`, `v5p:2x2x1`, `v6e:2x2`, ...; generations in CHIPS).
A topology up to a generation's single-host size (CHIPS[...].chips_per_host) is one host, as
Cloud TPU's single-host slices are; a larger one spans hosts of that many chips, and the JSON
gives the hosts and each host's share of the global batch. libtpu's compile-only v4 topology has
two devices per chip (no megacore), so v4 is not offered.

Every time and rate in the JSON is a bound or an estimate, not a measurement: `step_s_bound`
is XLA's FLOP count over the chip's peak (a roofline bound: no step is faster), `images_per_s_at
_peak` its rate, `images_per_s_at_utilisation` the same at --utilisation of the peak (an assumed
model FLOP utilisation), and the paper's 200 ImageNette epochs at both. XLA's own
`optimal_seconds` is kept only where it is positive. The FLOPs count as XLA's cost analysis
counts them (a multiply-add is 2); on TPUs a float32 convolution runs at JAX's default precision
(one bfloat16 pass), so the bfloat16 peak bounds both precisions.
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: may restart; XLA reads its flags once

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from experiments.configs import paper, probe  # noqa: E402
from vi_simsiam_jax import train, train_state  # noqa: E402
from vi_simsiam_jax.evaluation import encoder, linear_probe  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures (bfloat16 peak, HBM) and its single-host
    slice size, from Cloud TPU's system-architecture pages (docs.cloud.google.com/tpu/docs/
    v5e, /v5p, /v6e)."""

    peak_flops: float
    hbm_bytes: float
    chips_per_host: int


CHIPS = {"v5e": Chip(peak_flops=197e12, hbm_bytes=16e9, chips_per_host=8),
         "v5p": Chip(peak_flops=459e12, hbm_bytes=95e9, chips_per_host=4),
         "v6e": Chip(peak_flops=918e12, hbm_bytes=32e9, chips_per_host=8)}
PRECISIONS = ("float32", "bfloat16")
STEPS = ("pretrain", "probe", "features")
IMAGENETTE_TRAIN = 9469  # images per pretraining epoch (ImageNette 160 px train split)
PAPER_EPOCHS = 200
SOURCE_SIZE = 160  # side of the uint8 source images the pretraining step crops its views from

_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5e:1x1", "v5e:2x4", "v5p:2x2x1"],
                                "libtpu topology names.")
_PRECISIONS = flags.DEFINE_list("precisions", list(PRECISIONS), "Subset of float32, bfloat16.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["64"],
                                 "Global pretraining batch sizes (the paper's: 64).")
_STEPS = flags.DEFINE_list("steps", list(STEPS), "Subset of pretrain, probe, features.")
_UTILISATION = flags.DEFINE_float("utilisation", 0.4,
                                  "Assumed fraction of the chip's peak for the estimates.")
_LARGEST_BATCH = flags.DEFINE_list(
    "largest_batch", ["v5e:1x1"], "Topologies on which to also search the largest per-chip "
    "pretraining batch that fits HBM (2-4 more compiles per precision).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/tpu_compile", "One JSON per case.")


def topology(name: str) -> tuple[Chip, list[jax.Device], int]:
    """(chip, devices, hosts) of a libtpu topology name such as "v5e:2x4"."""
    generation, _, shape = name.partition(":")
    if generation not in CHIPS:
        raise app.UsageError(f"--topologies: {name!r} is not one of the generations "
                             f"{sorted(CHIPS)} (as 'v5e:2x4').")
    bounds = [int(side) for side in shape.split("x")]
    chip = CHIPS[generation]
    options = {}
    if math.prod(bounds) <= chip.chips_per_host:  # a single-host slice
        options["chips_per_host_bounds"] = tuple(bounds + [1] * (3 - len(bounds)))
    devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                **options).devices)
    return chip, devices, len({device.process_index for device in devices})


def abstract(tree: Any, leading: tuple[int, ...] = (), sharding: Any = None) -> Any:
    """ShapeDtypeStructs of tree's leaves with `leading` axes prepended."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(leading + tuple(x.shape), x.dtype,
                                                       sharding=sharding), tree)


def pretrain_step(devices: list[jax.Device], batch_size: int, half_precision: bool
                  ) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The lowering of the pmapped pretraining step over `devices`, and what it processes."""
    config = paper.get_config("imagenette,vi_simsiam")
    config.update(batch_size=batch_size, half_precision=half_precision, conv="xla")
    model = train_state.make_model(config, axis_name=train_state.AXIS_NAME)
    n, per_device = len(devices), batch_size // len(devices)
    state = abstract(train_state.abstract_train_state(config, model), (n,))
    batch = {"image": jax.ShapeDtypeStruct((n, per_device, SOURCE_SIZE, SOURCE_SIZE, 3),
                                           jnp.uint8),
             "size": jax.ShapeDtypeStruct((n, per_device, 2), jnp.int32),
             "position": jax.ShapeDtypeStruct((n, per_device), jnp.int32)}
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), n))
    step = train.make_p_train_step(model, config, devices=devices)
    hyper = train_state.hyperparameters(config, IMAGENETTE_TRAIN // batch_size)
    return (lambda: step.lower(state, batch, keys, hyper)), {
        "chips": n, "images_per_step": batch_size, "per_chip_batch": per_device,
        "views": [list(shape[1:3]) for shape in train_state.view_shapes(config, batch_size)]}


def probe_step(devices: list[jax.Device]) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The lowering of the linear probe's head step (`head_train_step`) on the first chip:
    ResNet-18 features of one probe batch, as `linear_probe.fit_linear_head` runs it."""
    config = probe.get_config()
    features_dim, classes = 512, 10  # ResNet-18's pooled features; ImageNette's classes
    one = NamedSharding(Mesh(np.array(devices[:1]), ("chip",)), PartitionSpec())
    state = jax.eval_shape(lambda: linear_probe.create_head_state(
        jax.random.key(0), features_dim, classes,
        linear_probe.lars_optimizer(config.learning_rate, 1000, config), config.head_batch_norm))
    inputs = (abstract(state, sharding=one),
              jax.ShapeDtypeStruct((config.batch_size, features_dim), jnp.float32, sharding=one),
              jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=one))
    return (lambda: linear_probe.head_train_step.lower(*inputs)), {
        "chips": 1, "images_per_step": config.batch_size, "per_chip_batch": config.batch_size}


def features_step(devices: list[jax.Device], half_precision: bool
                  ) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The lowering of `encoder.encode` on a batch split over every chip (centre crops at the
    paper's global crop size, the probe's extraction batch per chip)."""
    config = paper.get_config("imagenette,vi_simsiam")
    config.update(half_precision=half_precision, conv="xla")
    model = train_state.make_model(config, axis_name=None)
    per_device = probe.get_config().extract_batch_size
    mesh = Mesh(np.array(devices), ("data",))
    variables = abstract(train_state.abstract_variables(config, model),
                         sharding=NamedSharding(mesh, PartitionSpec()))
    images = jax.ShapeDtypeStruct((len(devices), per_device, config.global_size,
                                   config.global_size, 3), jnp.float32,
                                  sharding=NamedSharding(mesh, PartitionSpec("data")))
    return (lambda: encoder.encode.lower(model, variables, images)), {
        "chips": len(devices), "images_per_step": len(devices) * per_device,
        "per_chip_batch": per_device}


def compiled_figures(lower: Callable[[], Any], chip: Chip) -> dict[str, Any]:
    """Compile time, per-chip memory and FLOPs of the lowered step."""
    start = time.perf_counter()
    compiled = lower().compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    parts = {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
             "temporary": memory.temp_size_in_bytes,
             "code": memory.generated_code_size_in_bytes}
    # Donated arguments are updated in place: outputs that alias them take no more memory.
    total = sum(parts.values()) - memory.alias_size_in_bytes
    figures = {"compile_s": round(seconds, 1),
               "per_chip_bytes": {**parts, "aliased": memory.alias_size_in_bytes,
                                  "total": total},
               "hbm_bytes": chip.hbm_bytes, "hbm_used": round(total / chip.hbm_bytes, 4),
               "fits_hbm": total <= chip.hbm_bytes, "flops_per_chip": cost.get("flops")}
    if cost.get("optimal_seconds", 0) > 0:
        figures["xla_optimal_seconds"] = cost["optimal_seconds"]
    return figures


def bounds(figures: dict[str, Any], chip: Chip, images_per_step: int) -> dict[str, Any]:
    """The roofline bound on a step's time and the rates that follow (labelled)."""
    step_s = figures["flops_per_chip"] / chip.peak_flops
    rate = images_per_step / step_s
    return {"peak_flops_per_chip": chip.peak_flops, "step_s_bound": step_s,
            "images_per_s_at_peak": rate,
            "images_per_s_at_utilisation": rate * _UTILISATION.value,
            "utilisation": _UTILISATION.value,
            "note": "bounds and estimates from XLA's FLOP count and the chip's published peak "
                    "(no measurement)"}


def largest_batch(devices: list[jax.Device], chip: Chip, half_precision: bool,
                  base: int, base_bytes: int) -> dict[str, Any]:
    """The largest per-chip pretraining batch whose step fits the chip's HBM. A step's bytes
    are linear in the batch, so the compiles at `base` (its bytes given) and 2 x base give the
    line; the largest batch (a multiple of 8) below HBM on it is compiled to check, and lowered
    by 5% until it fits (at most 3 checks)."""
    n = len(devices)
    lower, _ = pretrain_step(devices, 2 * base * n, half_precision)
    slope = (compiled_figures(lower, chip)["per_chip_bytes"]["total"] - base_bytes) / base
    predicted = int((chip.hbm_bytes - base_bytes) / slope + base) // 8 * 8
    per_chip = predicted
    for _ in range(3):
        lower, _ = pretrain_step(devices, per_chip * n, half_precision)
        total = compiled_figures(lower, chip)["per_chip_bytes"]["total"]
        if total <= chip.hbm_bytes:
            return {"per_chip_batch": per_chip, "bytes": total, "predicted": predicted,
                    "bytes_per_image": slope, "method": f"linear in the batch from compiles at "
                    f"{base} and {2 * base} per chip, checked by compiling {per_chip}"}
        per_chip = int(per_chip * 0.95) // 8 * 8
    return {"per_chip_batch": None, "predicted": predicted, "bytes_per_image": slope}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = (set(_PRECISIONS.value) - set(PRECISIONS)) | (set(_STEPS.value) - set(STEPS))
    if unknown:
        raise app.UsageError(f"Unknown --precisions or --steps: {sorted(unknown)}.")
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    for name in _TOPOLOGIES.value:
        chip, devices, hosts = topology(name)
        for precision in _PRECISIONS.value:
            half = precision == "bfloat16"
            cases = []
            if "pretrain" in _STEPS.value:
                cases += [(f"pretrain_b{b}", *pretrain_step(devices, int(b), half))
                          for b in _BATCH_SIZES.value]
            if "probe" in _STEPS.value and not half:  # the head trains in float32 either way
                cases.append(("probe", *probe_step(devices)))
            if "features" in _STEPS.value:
                cases.append(("features", *features_step(devices, half)))
            for step, lower, shapes in cases:
                figures = compiled_figures(lower, chip)
                case = {"topology": name, "device_kind": devices[0].device_kind,
                        "hosts": hosts, "step": step.split("_")[0], "precision": precision,
                        **shapes, "per_host_batch": shapes["images_per_step"] // (
                            hosts if shapes["chips"] > 1 else 1), **figures,
                        **bounds(figures, chip, shapes["images_per_step"]),
                        "jax_version": jax.__version__}
                if step.startswith("pretrain"):
                    case["paper_run_hours_at_peak"] = (
                        PAPER_EPOCHS * IMAGENETTE_TRAIN / case["images_per_s_at_peak"] / 3600)
                    case["paper_run_hours_at_utilisation"] = (
                        case["paper_run_hours_at_peak"] / _UTILISATION.value)
                    if name in _LARGEST_BATCH.value and step == cases[0][0]:
                        case["largest_per_chip_batch"] = largest_batch(
                            devices, chip, half, shapes["per_chip_batch"],
                            figures["per_chip_bytes"]["total"])
                path = os.path.join(_OUTPUT_DIR.value, f"{name.replace(':', '_')}_{step}_"
                                    f"{precision}.json")
                with open(path, "w") as f:
                    json.dump(case, f, indent=1)
                print(json.dumps(case), flush=True)


if __name__ == "__main__":
    app.run(main)
