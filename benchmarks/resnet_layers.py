"""ResNet-18's convolution layers, one by one: ms for the forward, the input gradient and the
weight gradient in each formulation of `vi_simsiam_jax.cpu.conv`, against PyTorch's.

    python -m benchmarks.resnet_layers --image_size=32 --stem=cifar --batch_size=128

Prints one JSON line per layer shape (distinct shapes once, with how many times ResNet-18 has it):
`jax_ms` maps "forward/native", "input_grad/phases", "weight_grad/chunked", ... to the best of
--repeats jitted calls ("dense" only where the map has at most as many pixels as the kernel,
"winograd" only for 3x3 stride-1 layers, "taps" only for stride-1 layers);
`auto` is the plan `conv.choose` makes; `torch_ms` (from
benchmarks/torch_resnet_layers.py in --torch_python, 2 threads) has "forward", "input_grad" and
"weight_grad" for torch.nn.Conv2d (NCHW). The layers are timed alone, so concurrency and caches
differ from the step: `benchmarks.train_step` decides, this shows where each piece stands.
"""

import json
import os
import pathlib
import time

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: may restart the process; XLA reads its flags once

import jax  # noqa: E402  (after the launcher)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import peer  # noqa: E402
from vi_simsiam_jax.cpu import conv  # noqa: E402

flags.DEFINE_integer("image_size", 32, "Side of the input images, in pixels.")
flags.DEFINE_enum("stem", "cifar", ["imagenet", "cifar"], "ResNet-18 stem.")
flags.DEFINE_integer("batch_size", 128, "Images per call (the step's 2 views x 64).")
flags.DEFINE_integer("repeats", 5, "Timed calls per figure; the fastest is reported.")
flags.DEFINE_string("torch_python", "/tmp/torchref/bin/python" if os.path.exists(
    "/tmp/torchref/bin/python") else "", "Interpreter with torch for the peer; empty: skip.")
FLAGS = flags.FLAGS


def layer_shapes(image_size: int, stem: str) -> list[tuple[int, int, int, int, int, int]]:
    """(input side, cin, cout, kernel, stride, count) of ResNet-18's convolutions, in order."""
    if stem == "cifar":
        shapes, side = [(image_size, 3, 64, 3, 1, 1)], image_size
    else:
        shapes, side = [(image_size, 3, 64, 7, 2, 1)], image_size // 4
    for stage in range(4):
        cin, cout = 64 * 2 ** max(stage - 1, 0), 64 * 2 ** stage
        if stage:
            shapes += [(side, cin, cout, 3, 2, 1), (side, cin, cout, 1, 2, 1)]
            side = (side + 1) // 2
        shapes.append((side, cout, cout, 3, 1, 4 if stage == 0 else 3))
    return shapes


def best_ms(fn, *args) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return round(min(times) * 1e3, 2)


def jax_pieces(side, cin, cout, k, stride) -> dict[str, float]:
    rng = np.random.default_rng(0)
    pad = ((k - 1) // 2,) * 2
    padding, strides = (pad, pad), (stride, stride)
    out = (side + 2 * pad[0] - k) // stride + 1
    x = jnp.asarray(rng.standard_normal((FLAGS.batch_size, side, side, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32))
    g = jnp.asarray(rng.standard_normal((FLAGS.batch_size, out, out, cout), np.float32))
    ms = {}
    def kinds(all_kinds):  # dense: only where it is small; winograd, taps: where they apply
        return [kind for kind in all_kinds
                if (kind != "dense" or side * side <= k * k)
                and (kind != "winograd" or conv.winograd_applies((k, k), strides, padding))
                and (kind != "taps" or stride == 1)]

    for kind in kinds(conv.FORWARDS):
        ms[f"forward/{kind}"] = best_ms(
            lambda x, w, kind=kind: conv._forward(kind, x, w, strides, padding, None), x, w)
    if cin != 3:  # the stem's input gradient (of the images) is never computed
        for kind in kinds(conv.INPUT_GRADS):
            ms[f"input_grad/{kind}"] = best_ms(lambda g, w, kind=kind: conv._input_grad(
                kind, g, w, x.shape, strides, padding, None), g, w)
    for kind in kinds(conv.WEIGHT_GRADS):
        ms[f"weight_grad/{kind}"] = best_ms(lambda x, g, kind=kind: conv._weight_grad(
            kind, x, g, w.shape, strides, padding, None), x, g)
    return ms


def main(argv: list[str]) -> None:
    del argv
    shapes = layer_shapes(FLAGS.image_size, FLAGS.stem)
    torch_rows = []
    if FLAGS.torch_python:
        script = pathlib.Path(__file__).with_name("torch_resnet_layers.py")
        torch_rows = peer.run_json([FLAGS.torch_python, str(script), json.dumps(shapes),
                                    str(FLAGS.batch_size), str(FLAGS.repeats)])["rows"]
    for i, (side, cin, cout, k, stride, count) in enumerate(shapes):
        pad = ((k - 1) // 2,) * 2
        plan = conv.choose((FLAGS.batch_size, side, side, cin), (k, k, cin, cout),
                           (stride, stride), (pad, pad))
        row = {"side": side, "cin": cin, "cout": cout, "kernel": k, "stride": stride,
               "count": count, "auto": [plan.forward, plan.input_grad, plan.weight_grad],
               "jax_ms": jax_pieces(side, cin, cout, k, stride)}
        if torch_rows:
            row["torch_ms"] = torch_rows[i]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
