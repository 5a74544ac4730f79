"""Speed of the real pretraining step (`vi_simsiam_jax.train`), against the PyTorch reference.

    python -m benchmarks.train_step --method=vi_simsiam --image_size=64 --batch_size=64 \
        --views=2 --dim=2048 --pred_dim=512 --stem=imagenet --steps=5

times `train.make_p_train_step` (the pmapped `train.train_step` that pretraining runs) on
synthetic views, with the architecture, loss and optimiser of ../shared/bench/torch_reference.py:
ResNet-18 -> projector (dim, dim, dim) -> predictor (pred_dim, dim + 1 for vi_simsiam), SGD lr
1e-3, momentum 0.9, weight decay 1e-4, BN weights not zero-initialised. It prints one JSON line
with the reference's fields (`images_per_sec` counts source images, each seen in every view;
`step_s`; `first_step_s`, compile included) plus compile_s, FLOPs per step, the achieved
GFLOP/s and its fraction of the machine's float32 peak (`peak_gflops`, from --peak_gflops or
computed from /proc/cpuinfo by benchmarks/peak_flops.py, and `peak_source`, how it was obtained;
all three null on an accelerator without --peak_gflops), and peak memory; with --profile, the
time per step of each kind of XLA op, from a jax.profiler trace. FLOPs: `flops_per_step` is
XLA's cost analysis of the compiled step (what it executes: Winograd convolutions do fewer
multiplications, and the body of a loop, such as a chunk loop of `conv`, is
counted once);
`direct_flops_per_step` is XLA's count for the same step with plain nn.Conv (the direct
method's arithmetic, which PyTorch does), and GFLOP/s and the fraction of peak use it.

With --torch_python (default /tmp/torchref/bin/python when it exists) the reference runs in the
same invocation: benchmarks/torch_train_step.py builds its model, optimiser and inputs from
--torch_script and stays alive, and the two alternate, --steps JAX steps then --steps PyTorch
steps, for --rounds rounds (a machine's speed can drift over tens of seconds: benchmarks/
README.md, "Known variance"; so both are timed step by step in the same stretches). `step_s`
and `torch_step_s` are the medians of the single-step times, and the ratio is theirs.
Same semantics on both sides: every view has its own BatchNorm statistics (the default
bn_views="separate"; the JAX step runs the convolutions once on the concatenated views, PyTorch
once per view) and the loss is the reference's mean over the view pairs; FLOPs are the same.
--bn_views=joint shares the statistics among the views instead (SwAV/DINO multi-crop).

A pretraining config instead of the reference's shapes, and the real loop on it:

    python -m benchmarks.train_step --config=experiments/configs/cpu_demo.py --loop_epochs=1

times the pretraining step of that config (global and local crops, its model and batch; no
PyTorch peer, whose script has one crop size) fed uint8 160 px source images, the views made
inside it, as `step_s`; beside it, in alternation, the same step on ready views as
`views_step_s`, and `augmentation_ratio`, the median over the pairs of a step and the view
step timed next to it of their ratio (with --steps=1, adjacent steps). Then, with
--loop_epochs, runs `loop.pretrain` on the config's dataset for that many epochs in a
temporary workdir (input pipeline, metrics, checkpoints: everything `experiments.pretrain`
does). `loop_step_s` is the loop's time per step after its first log interval (which holds the
compilation), from its metrics.jsonl; `loop_fraction_of_step` = step_s / loop_step_s.
"""

import collections
import glob
import gzip
import json
import os
import pathlib
import re
import resource
import statistics
import tempfile
import time

from vi_simsiam_jax import launch

CPU_SETUP = launch.configure(__name__)  # first: may restart; XLA reads its flags once

import jax  # noqa: E402  (after the launcher)
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import compiled_step, peak_flops, peer  # noqa: E402
from experiments.configs import paper  # noqa: E402
from vi_simsiam_jax import backends, loop, models, train, train_state  # noqa: E402
from vi_simsiam_jax.cpu import conv as conv_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A pretraining config to time instead of the reference's shapes (the flags "
    "method ... stem are then unused, and there is no PyTorch peer).", lock_config=False)
flags.DEFINE_integer("loop_epochs", 0, "With --config: also time the real pretraining loop for "
                     "this many epochs (0: the step only).")
flags.DEFINE_enum("method", "vi_simsiam", ["vi_simsiam", "simsiam"], "Loss.")
flags.DEFINE_integer("image_size", 64, "Side of every view, in pixels.")
flags.DEFINE_integer("batch_size", 64, "Source images per step (each is seen in every view).")
flags.DEFINE_integer("views", 2, "Views per image (all global crops of image_size).")
flags.DEFINE_integer("dim", 2048, "Projection dimension (and projector hidden width).")
flags.DEFINE_integer("pred_dim", 512, "Predictor hidden width.")
flags.DEFINE_enum("stem", "imagenet", ["imagenet", "cifar"], "ResNet-18 stem.")
flags.DEFINE_enum("bn_views", "separate", list(models.BN_VIEWS),
                  "BatchNorm statistics per view (as the reference) or shared among the views.")
flags.DEFINE_integer("steps", 5, "Timed steps per round, of each framework.")
flags.DEFINE_integer("rounds", 1, "Rounds of (JAX, PyTorch) steps; medians over every step.")
flags.DEFINE_integer("warmup", 3, "Untimed steps of each framework after its first (XLA:CPU's "
                     "heap grows to its peak, with page faults, over the first few steps).")
flags.DEFINE_enum("conv", None, list(backends.LAYER_CHOICES),
                  "Overrides config.conv (vi_simsiam_jax.backends): 'auto' = the backend's "
                  "layers; 'xla' = XLA's own; 'cpu_<policy>' = the CPU plans with that policy.")
flags.DEFINE_string("torch_python", "/tmp/torchref/bin/python" if os.path.exists(
    "/tmp/torchref/bin/python") else "", "Interpreter with torch for the reference; empty: skip.")
flags.DEFINE_string("torch_script", str(pathlib.Path(__file__).resolve().parents[2]
                                        / "shared" / "bench" / "torch_reference.py"),
                    "The PyTorch reference script.")
flags.DEFINE_integer("threads", 2, "PyTorch intra-op threads (JAX uses every core).")
flags.DEFINE_bool("profile", False, "Also trace --steps steps with jax.profiler and report the "
                  "time per step of each kind of XLA op (fusion kinds, convolutions, ...).")
flags.DEFINE_float("peak_gflops", None, "float32 peak of the machine in GFLOP/s, for the achieved "
                   "fraction; default: computed from /proc/cpuinfo (benchmarks/peak_flops.py, "
                   "which assumes 2 FMA units per core), none on an accelerator.")
FLAGS = flags.FLAGS


def bench_config():
    """--config, or paper.py with the reference's shapes: `views` global crops, no local crops;
    --conv's layers if given."""
    config = _CONFIG.value if _CONFIG.value is not None else _reference_config()
    if FLAGS.conv:
        config.conv = FLAGS.conv
    return config


def _reference_config():
    config = paper.get_config(f"imagenette,{FLAGS.method}")
    config.global_crops, config.local_crops = FLAGS.views, 0
    config.global_size = FLAGS.image_size
    config.batch_size = FLAGS.batch_size
    config.model.update(stem=FLAGS.stem, zero_init_residual=False, proj_hidden_dim=FLAGS.dim,
                        dim=FLAGS.dim, pred_dim=FLAGS.pred_dim, bn_views=FLAGS.bn_views)
    config.loss_reduction = "mean"  # the reference's scale
    return config


def _cost(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


class JaxStep(compiled_step.CompiledStep):
    """The compiled step of `config` (with --conv) on one device, and its FLOPs."""

    def __init__(self, config, augment_views: bool):
        model = train_state.make_model(config)
        super().__init__(config, model, augment_views=augment_views)
        self.flops = _cost(self.compiled)
        # The direct method's arithmetic (what PyTorch computes): XLA's count for the same step
        # with nn.Conv, before compilation.
        native_step = train.make_p_train_step(model.clone(conv=conv_lib.nn.Conv), config,
                                              augment_views=augment_views)
        self.direct_flops = _cost(native_step.lower(self.state, self.inputs, self.keys,
                                                    self.hyper))
        self.first_step_s = self.first_step()


def op_time_by_kind(step: JaxStep, steps: int, top: int = 12) -> dict[str, float]:
    """ms per step spent in each kind of XLA:CPU op (name without its ".N" suffix), from a
    jax.profiler trace of `steps` steps. Ops run concurrently: the sum can exceed the step."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            step.time_steps(steps)
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for event in events:  # XLA ops are named like "ynn_fusion.12"; host-side events are not
        op = re.fullmatch(r"([a-z][\w-]*)(\.\d+)?", event.get("name", ""))
        if event.get("ph") == "X" and op:
            totals[op.group(1)] += event.get("dur", 0)
    return {name: round(us / 1e3 / steps, 1) for name, us in totals.most_common(top)}


def loop_step_s(config, epochs: int) -> dict[str, float]:
    """Seconds per step of `loop.pretrain` on config for `epochs` epochs, after its
    first log interval, and the whole run's wall time."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.num_epochs = epochs
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        loop.pretrain(config, workdir)
        wall_s = time.perf_counter() - start
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    if len(records) < 2:
        raise ValueError("--loop_epochs gives fewer than two log intervals; log more often.")
    steps = [b["step"] - a["step"] for a, b in zip(records, records[1:])]
    seconds = sum(n * config.batch_size / r["images_per_sec"] for n, r in zip(steps, records[1:]))
    return {"loop_step_s": round(seconds / sum(steps), 4), "loop_steps": records[-1]["step"],
            "loop_wall_s": round(wall_s, 1)}


def torch_peer() -> peer.Server | None:
    """benchmarks/torch_train_step.py on the reference, with this benchmark's shapes."""
    if not FLAGS.torch_python or _CONFIG.value is not None:
        return None
    command = [FLAGS.torch_python, str(pathlib.Path(__file__).with_name("torch_train_step.py")),
               FLAGS.torch_script, f"--method={FLAGS.method}",
               f"--image_size={FLAGS.image_size}", f"--batch_size={FLAGS.batch_size}",
               f"--views={FLAGS.views}", f"--dim={FLAGS.dim}", f"--pred_dim={FLAGS.pred_dim}",
               f"--threads={FLAGS.threads}"]
    if FLAGS.stem == "cifar":
        command.append("--cifar_stem")
    return peer.Server(command)


def main(argv: list[str]) -> None:
    del argv
    config = bench_config()
    # A config's step makes its views from source images, as pretraining does, and is timed
    # beside the same step on ready views; the reference's shapes are timed on views, as the
    # PyTorch peer is.
    with_config = _CONFIG.value is not None
    step = JaxStep(config, augment_views=with_config)
    view_step = JaxStep(config, augment_views=False) if with_config else None
    reference = torch_peer()
    step.time_steps(FLAGS.warmup)
    if view_step:
        view_step.time_steps(FLAGS.warmup)
    if reference:
        reference.request(str(FLAGS.warmup))
    jax_times, view_times, torch_times = [], [], []
    loss, torch_loss = float("nan"), float("nan")
    for _ in range(FLAGS.rounds):
        times, loss = step.time_steps(FLAGS.steps)
        jax_times += times
        if view_step:
            view_times += view_step.time_steps(FLAGS.steps)[0]
        if reference:
            reply = reference.request(str(FLAGS.steps))
            torch_times += reply["step_s"]
            torch_loss = reply["loss"]
    if reference:
        reference.close()
    step_s = statistics.median(jax_times)
    gflops = step.direct_flops / step_s / 1e9
    peak = (peak_flops.Peak(FLAGS.peak_gflops, "--peak_gflops") if FLAGS.peak_gflops
            else peak_flops.machine_peak(jax.default_backend()))
    views = train_state.view_shapes(config, config.batch_size)
    result = {
        "impl": "jax", "method": config.method, "view_sizes": [v[1] for v in views],
        "batch_size": config.batch_size, "stem": config.model.stem,
        "bn_views": config.model.bn_views,
        "conv": FLAGS.conv, "backend": jax.default_backend(), "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "huge_pages": CPU_SETUP.get("huge_pages"),
        "first_step_s": round(step.first_step_s, 3), "compile_s": round(step.compile_s, 3),
        "step_s": round(step_s, 4), "images_per_sec": round(config.batch_size / step_s, 2),
        "loss": round(loss, 4), "flops_per_step": step.flops,
        "direct_flops_per_step": step.direct_flops, "gflops_per_sec": round(gflops, 1),
        "peak_gflops": peak.gflops if peak else None,
        "peak_source": peak.source if peak else None,
        "fraction_of_peak": round(gflops / peak.gflops, 3) if peak else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "xla_temp_mib": step.memory_mib()["xla_temp_mib"],
        "step_s_all": [round(t, 3) for t in jax_times],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if FLAGS.profile:
        result["op_ms_per_step"] = op_time_by_kind(step, FLAGS.steps)
    if view_times:
        # Paired: each timed step against the view step timed right after it, so the ratio
        # does not drift with the machine's speed.
        ratios = [a / v for a, v in zip(jax_times, view_times)]
        result.update(views_step_s=round(statistics.median(view_times), 4),
                      augmentation_ratio=round(statistics.median(ratios), 3))
    if FLAGS.loop_epochs:
        if _CONFIG.value is None:
            raise app.UsageError("--loop_epochs needs --config (the loop reads its dataset).")
        result.update(loop_step_s(config, FLAGS.loop_epochs))
        # The machine's speed drifts over the minutes of the loop: the step is timed again
        # after it, and the loop compared with the step's median on both sides.
        after, _ = step.time_steps(FLAGS.steps * FLAGS.rounds)
        result.update(step_s_after_loop=round(statistics.median(after), 4),
                      loop_fraction_of_step=round(
                          statistics.median(jax_times + after) / result["loop_step_s"], 3))
    if torch_times:
        torch_step_s = statistics.median(torch_times)
        result.update(torch_first_step_s=reference.ready["first_step_s"],
                      torch_step_s=round(torch_step_s, 4),
                      torch_images_per_sec=round(FLAGS.batch_size / torch_step_s, 2),
                      torch_step_s_all=[round(t, 3) for t in torch_times],
                      torch_loss=round(torch_loss, 4),
                      ratio_images_per_sec=round(torch_step_s / step_s, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
