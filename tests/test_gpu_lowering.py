"""The pretraining step as a GPU host builds it, lowered for CUDA on this CPU-only machine
(`jax.export`, no GPU needed): its module holds no CPU-only custom call, and the CPU convolution
plans (`vi_simsiam_jax/cpu/`) do not leak into it."""

import re
from unittest import mock

import jax
import jax.numpy as jnp

from tests import tiny_config
from vi_simsiam_jax import train, train_state

# Custom-call targets a CUDA module may hold: CUDA libraries' (cuSOLVER, cuBLAS, ...), GPU
# kernels and callbacks, and XLA's platform-independent sharding markers.
GPU_PREFIXES = ("cu", "__gpu", "xla_python_gpu_callback", "Sharding", "SPMD")


def custom_calls(module: str) -> set[str]:
    """The custom-call targets of a StableHLO module's text."""
    return set(re.findall(r"custom_call @([\w$.]+)", module))


def not_gpu(module: str) -> set[str]:
    return {target for target in custom_calls(module) if not target.startswith(GPU_PREFIXES)}


def _cuda_module(conv: str, backend: str) -> str:
    """The tiny config's pretraining step with `conv`, its layers chosen as on `backend`,
    lowered for CUDA."""
    config = tiny_config.get_config()
    config.conv = conv
    with mock.patch("jax.default_backend", return_value=backend):
        model = train_state.make_model(config, axis_name=None)
    step = jax.jit(train.configured_pretrain_step(model, config, steps_per_epoch=10))
    batch = {"image": jax.ShapeDtypeStruct((8, 24, 24, 3), jnp.uint8),
             "size": jax.ShapeDtypeStruct((8, 2), jnp.int32),
             "position": jax.ShapeDtypeStruct((8,), jnp.int32)}
    exported = jax.export.export(step, platforms=("cuda",))(
        train_state.abstract_train_state(config, model), batch,
        jax.eval_shape(lambda: jax.random.key(0)))
    text = re.sub(r"^#loc.*\n", "", exported.mlir_module(), flags=re.MULTILINE)
    return re.sub(r" loc\(#loc\d*\)", "", text)  # source locations differ by call site


def test_the_gpu_step_has_no_cpu_custom_call_and_no_cpu_plan():
    gpu = _cuda_module("auto", "gpu")
    assert not_gpu(gpu) == set()
    # "auto" on a GPU is XLA's own convolutions, op for op; on a CPU it is the CPU plans,
    # which would change the module (Winograd and dense plans replace convolutions by matmuls).
    assert gpu == _cuda_module("xla", "gpu")
    cpu_plans = _cuda_module("auto", "cpu")
    assert cpu_plans != gpu
    assert cpu_plans.count("stablehlo.convolution") < gpu.count("stablehlo.convolution")


def test_the_check_finds_a_cpu_custom_call():
    """A Cholesky factorisation is LAPACK on the CPU and cuSOLVER on CUDA."""
    cholesky = jax.jit(jnp.linalg.cholesky)
    matrix = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    on_cpu = jax.export.export(cholesky, platforms=("cpu",))(matrix).mlir_module()
    on_cuda = jax.export.export(cholesky, platforms=("cuda",))(matrix).mlir_module()
    assert not_gpu(on_cpu) == {"lapack_spotrf_ffi"}
    assert not_gpu(on_cuda) == set() and custom_calls(on_cuda) == {"cusolver_potrf_ffi"}
