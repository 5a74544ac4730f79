# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATASETS ?= $(abspath ../shared/datasets)

.PHONY: install test test-portable test-newest demo compile-tpu clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Tests run in PYTEST_WORKERS processes (pytest-xdist); an idle worker takes queued tests from
# the other (--dist worksteal), so the longest tests need not end up on one worker.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal

test: install
	$(PYTEST)

# The suite as a CPU without AVX-512 computes it: XLA generates AVX2 code, in the test process and
# in the processes it starts (tests/xla_flags.py keeps the user's XLA_FLAGS).
test-portable: install
	XLA_FLAGS="$(XLA_FLAGS) --xla_cpu_max_isa=AVX2" $(PYTEST)

# The tests that need no tensorflow (Power Spherical, losses, models, CPU convolutions, the step
# in both precisions) against the newest jax, flax and optax that pyproject.toml's ranges allow:
# a fresh venv with `pip install .`, its versions printed first.
NEWEST_VENV ?= /tmp/vi-simsiam-jax-newest
TENSORFLOW_FREE_TESTS = tests/test_power_spherical.py tests/test_losses.py tests/test_models.py \
	tests/test_conv.py tests/test_train.py tests/test_half_precision.py \
	tests/test_imports.py::test_step_benchmark_runs_without_tensorflow
test-newest:
	rm -rf $(NEWEST_VENV) && $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet . pytest pytest-xdist tensorflow-probability
	$(NEWEST_VENV)/bin/python -m pip list 2>/dev/null \
		| grep -Ei '^(jax|jaxlib|flax|optax|chex|orbax-checkpoint|numpy|ml.collections) '
	$(NEWEST_VENV)/bin/python -m pytest $(TENSORFLOW_FREE_TESTS)

demo: install
	VI_SIMSIAM_DATASETS=$(SHARED_DATASETS) $(PY) -m experiments.demo --workdir=runs/demo

# The paper's steps compiled for TPU topologies on this CPU host, without a TPU
# (benchmarks/compile_tpu.py): a venv of its own with libtpu (`.[tpu]`, about 700 MB, so not in
# requirements.txt or CI), JSON per case in results/tpu_compile/, then the README tables.
TPU_VENV ?= .venv-tpu
compile-tpu: install
	test -x $(TPU_VENV)/bin/python || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/python -m pip install --quiet -c requirements.txt ".[tpu]"
	JAX_PLATFORMS=cpu $(TPU_VENV)/bin/python -m benchmarks.compile_tpu \
		--output_dir=results/tpu_compile
	JAX_PLATFORMS=cpu $(TPU_VENV)/bin/python -m benchmarks.compile_tpu --topologies=v5e:4x4 \
		--precisions=bfloat16 --batch_sizes=256 --steps=pretrain --largest_batch= \
		--output_dir=results/tpu_compile
	$(PY) -m experiments.results_readme

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache
