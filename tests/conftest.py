"""Shared fixtures: a small text corpus and a tiny config that compiles and trains in seconds."""

import os
import sysconfig

import pytest

from configs import default


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
  """The default config shrunk: 2 layers of width 64, 32-token rows, batches of 8."""
  c = default.get_config()
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ungated_d_ff=192,
                 max_seq_len=64, d_ff_multiple_of=64)
  c.data.update(seq_len=32, text_glob=corpus_glob, data_dir=data_dir, prefetch=0)
  c.train.update(num_steps=6, global_batch_size=8, warmup_steps=2, log_every=1,
                 checkpoint_every=3, eval_every=0, eval_batches=2, learning_rate=3e-3)
  c.train.update(train_overrides)
  c.eval.update(batch_size=8, max_batches=2)
  return c


@pytest.fixture
def tiny(corpus_glob, data_dir):
  return lambda **kw: tiny_config(corpus_glob, data_dir, **kw)
