# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATASETS ?= $(abspath ../shared/datasets)

.PHONY: install test test-portable demo clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest

# The suite as a CPU without AVX-512 computes it: XLA generates AVX2 code, in the test process and
# in the processes it starts (tests/xla_flags.py keeps the user's XLA_FLAGS).
test-portable: install
	XLA_FLAGS="$(XLA_FLAGS) --xla_cpu_max_isa=AVX2" $(PY) -m pytest

demo: install
	VI_SIMSIAM_DATASETS=$(SHARED_DATASETS) $(PY) -m experiments.demo --workdir=runs/demo

clean:
	rm -rf $(VENV) .pytest_cache
