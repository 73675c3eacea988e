# The README's commands. `make test` and `make demo` set everything up from a fresh clone:
# a venv with torch (local wheel) and the pinned test dependencies, then fastpeft built with its
# CPU kernels and (when torch is a CUDA build and nvcc is found) its CUDA kernels.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
DEPS_STAMP := $(VENV)/.fastpeft-deps-stamp
PYTEST_ARGS ?=

.PHONY: setup build test demo bench wheel clean

setup: $(DEPS_STAMP)

$(DEPS_STAMP): requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -r requirements-test.txt
	touch $@

# Editable install: Python edits are live; C++/CUDA sources rebuild incrementally in build/.
build: $(DEPS_STAMP)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import json, fastpeft; print(json.dumps(fastpeft.build_info()))"

test: build
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

demo: build
	$(VENV)/bin/fastpeft demo

bench: build
	$(PY) -m bench.run

wheel: build
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist
