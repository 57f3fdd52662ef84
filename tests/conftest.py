"""Shared fixtures: a small text corpus and a tiny config that compiles and trains in seconds."""

import os
import sysconfig

import pytest

from configs import tiny


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
