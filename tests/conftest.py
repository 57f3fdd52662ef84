"""Shared fixtures: a small text corpus and a tiny config that compiles and trains in seconds."""

import os
import sysconfig

import pytest
from jax.extend import core as jax_core

from configs import tiny

# XLA's cheap CPU codegen for every test and every process a test starts: the suite's time is
# mostly compiling tiny programs, and these flags make that 3-10x faster (the scanned-layer
# tests of test_model.py: 145 s -> 52 s). Each check compares programs built the same way or a
# float64 reference with tolerances far above codegen differences. The TPU compile checks drop
# the variable: their memory and FLOP numbers are the production compiler's.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test's subprocess with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def jaxpr_eqns(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (pjit, custom_vjp, shard_map, scan)
  included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from jaxpr_eqns(sub)


@pytest.fixture(scope="session")
def corpus_glob(tmp_path_factory) -> str:
  """~60 real text documents (slices of standard-library modules), as a text_glob."""
  root = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:60]
  for name in names:
    with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
      text = f.read(4000)
    (root / f"{name}.txt").write_text(text, encoding="utf-8")
  return str(root / "*.txt")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("data_dir"))


def tiny_config(corpus_glob: str, data_dir: str, **train_overrides):
  """configs/tiny.py on the test corpus, with config.train fields overridden."""
  c = tiny.get_config()
  c.data.update(text_glob=corpus_glob, data_dir=data_dir)
  c.train.update(train_overrides)
  return c


@pytest.fixture(name="tiny")
def tiny_fixture(corpus_glob, data_dir):
  return lambda **kw: tiny_config(corpus_glob, data_dir, **kw)


# The files that take longest on 2 cores go first: `make test` runs one file per worker
# (-n 2 --dist loadfile), and a long file handed out last would end the run on one core.
LONGEST_FIRST = ("test_compile_check.py", "test_preemption.py", "test_sharding.py",
                 "test_model.py", "test_train.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
