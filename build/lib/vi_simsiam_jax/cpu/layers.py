"""Picks the model's convolution and pooling from `config.conv`: the one place where the CPU
plans are chosen."""

from typing import Any, Callable

import flax.linen as nn
import jax

from vi_simsiam_jax.cpu import conv, pooling

LAYER_CHOICES = ("auto", "xla")


def select(choice: str = "auto", backend: str | None = None
           ) -> tuple[Callable[..., nn.Module], Callable[..., Any]]:
    """(convolution module, max-pool function) for the model.

    "auto": the CPU plans (`conv.CpuConv`, `pooling.max_pool`) when `backend` (default: JAX's
    default backend) is the CPU, XLA's own `nn.Conv` and `nn.max_pool` on GPU and TPU;
    "xla": XLA's own everywhere (e.g. to compare against them on a CPU).
    """
    if choice not in LAYER_CHOICES:
        raise ValueError(f"conv must be one of {LAYER_CHOICES}, got {choice!r}.")
    if choice == "auto" and (backend or jax.default_backend()) == "cpu":
        return conv.CpuConv, pooling.max_pool
    return nn.Conv, nn.max_pool
