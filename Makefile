# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATASETS ?= $(abspath ../shared/datasets)

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest

demo: install
	VI_SIMSIAM_DATASETS=$(SHARED_DATASETS) $(PY) -m experiments.demo --workdir=runs/demo

clean:
	rm -rf $(VENV) .pytest_cache
