# Two commands that set everything up on a fresh machine (Python 3.11 + pip, no GPU):
#   make train   trains the default config on the built-in corpus, then evaluates it
#   make test    runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# libtpu (a tool/test extra for compiling for TPU topologies) lives in its own venv.
TPU_VENV ?= .venv-tpu
WORKDIR ?= workdirs/default
CONFIG ?= configs/default.py
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: venv tpu-venv train test

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

$(TPU_VENV)/.installed: requirements.txt requirements-tpu.txt
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install -q -r requirements-tpu.txt
	touch $@

tpu-venv: $(TPU_VENV)/.installed

train: venv
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) eval.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: venv tpu-venv
	POLYCOM_TPU_PYTHON=$(CURDIR)/$(TPU_VENV)/bin/python $(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests
