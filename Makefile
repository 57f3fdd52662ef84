# Two commands that set everything up on a fresh machine (Python 3.11 + pip, no GPU):
#   make train   trains the default config on the built-in corpus, then evaluates it
#   make test    runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/default
CONFIG ?= configs/default.py
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: venv train test

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) eval.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -q tests
