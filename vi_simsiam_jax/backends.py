"""The convolution and pooling each JAX backend runs the model with: the one place a
backend-specific implementation is chosen (`config.conv`). Every choice has the same parameters
and computes the same values (tests/test_conv.py).

On the CPU, the plans of `vi_simsiam_jax.cpu` (XLA:CPU's own convolutions are slow for some
shapes: benchmarks/README.md); on GPU and TPU, XLA's own. A backend with layers of its own gets
an entry in `_BACKEND_LAYERS`, checked against XLA's as tests/test_conv.py checks the CPU's.
"""

from typing import Any, Callable

import flax.linen as nn
import jax

from vi_simsiam_jax.cpu import conv, pooling

Layers = tuple[Callable[..., nn.Module], Callable[..., Any]]  # (convolution module, max-pool)

_XLA: Layers = (nn.Conv, nn.max_pool)
_BACKEND_LAYERS: dict[str, Layers] = {"cpu": (conv.CpuConv, pooling.max_pool)}
# "auto": the backend's layers; "xla": XLA's own everywhere; "cpu_<policy>": the CPU plans with
# one of their policies (`cpu.conv.POLICIES`) on any backend, to compare formulations.
LAYER_CHOICES = ("auto", "xla") + tuple(f"cpu_{policy}" for policy in conv.POLICIES)


def select(choice: str = "auto", backend: str | None = None) -> Layers:
    """(convolution module, max-pool function) for `choice` on `backend` (default: JAX's)."""
    assert choice in LAYER_CHOICES, choice  # config_schema checks the config's value
    if choice == "auto":
        return _BACKEND_LAYERS.get(backend or jax.default_backend(), _XLA)
    if choice == "xla":
        return _XLA
    return conv.cpu_conv(choice.removeprefix("cpu_")), pooling.max_pool
