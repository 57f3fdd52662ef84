"""The activation sweep (experiments/sweep.py): the protocol's order (learning-rate sweep on one
seed, extended past a winning edge, then the seeds at the best rate), the cache that makes a
rerun train nothing, the report's statistics (Welch's p-value, sanity orderings, the
"no significant difference" verdict), the baselines, and one real tiny run end to end."""

import json
import os

import ml_collections
import numpy as np
import pytest
from scipy import stats

from experiments import sweep, sweep_report
from polycom_jax import compile_cache


def _base(corpus_glob, data_dir):
  from conftest import tiny_config
  c = tiny_config(corpus_glob, data_dir)
  c.train.update(global_batch_size=8, log_every=1)
  c.eval.update(batch_size=8, max_batches=2)
  from configs import sweep_cpu
  c.experiment = sweep_cpu.get_config().experiment      # the study's settings, made tiny
  c.experiment.update(activations=("polynorm", "swiglu", "gelu", "relu2"), moe_activations=(),
                      tokens_per_param=0.01, learning_rates=(1e-3, 3e-3, 1e-2), evals_per_run=2)
  c.experiment.sizes = ml_collections.ConfigDict({"xs": {
      "d_model": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "ungated_d_ff": 64}})
  return c


# Held-out loss of a fake run: a parabola in log(lr) around a per-activation optimum, plus a
# per-seed offset; polynorm's optimum (1e-2 * 3) lies past the grid's top edge.
OPTIMUM = {"polynorm": 3e-2, "swiglu": 3e-3, "gelu": 3e-3, "relu2": 1e-3}
LEVEL = {"polynorm": 2.0, "swiglu": 2.1, "gelu": 2.3, "relu2": 2.2}


def _fake_train(calls):
  def train(c, work):
    act, lr, seed = c.model.activation, c.train.learning_rate, c.seed
    calls.append((act, lr, seed))
    loss = LEVEL[act] + 0.1 * np.log(lr / OPTIMUM[act]) ** 2 + 0.01 * seed
    return {"val_loss": float(loss), "train_loss": float(loss), "steps": 10, "tokens": 100,
            "params": 1000, "flops_per_token": 6e3, "tokens_per_sec": 1.0, "wall_s": 1.0,
            "curve": [{"step": 5, "eval_loss": loss + 0.1}, {"step": 10, "eval_loss": loss}],
            "coefficients": []}
  return train


def test_protocol_order_cache_and_report(corpus_glob, data_dir, tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(sweep, "train_and_summarise", _fake_train(calls))
  base, out = _base(corpus_glob, data_dir), str(tmp_path / "out")
  todo, done = sweep.run_sweep(base, out, command="cmd")
  assert not todo
  polynorm_lrs = sorted(lr for a, lr, s in calls if a == "polynorm" and s == 0)
  assert polynorm_lrs == [1e-3, 3e-3, 1e-2, 3e-2, 9e-2]      # extended twice past the top
  assert sorted(lr for a, lr, s in calls if a == "relu2" and s == 0) == [3.33e-4, 1e-3, 3e-3,
                                                                          1e-2]
  assert sorted(lr for a, lr, s in calls if a == "swiglu" and s == 0) == [1e-3, 3e-3, 1e-2]
  assert {(a, lr) for a, lr, s in calls if s > 0} == {
      ("polynorm", 3e-2), ("swiglu", 3e-3), ("gelu", 3e-3), ("relu2", 1e-3)}
  assert len(calls) == 5 + 4 + 3 + 3 + 4 * 2

  sweep.run_sweep(base, out)                                 # a rerun trains nothing
  assert len(calls) == 23

  text = open(os.path.join(out, "results.md")).read()
  arms = sweep_report.final_runs(done, base.experiment.seeds)
  a = [r["val_loss"] for r in arms[("xs", "polynorm")]]
  b = [r["val_loss"] for r in arms[("xs", "swiglu")]]
  p = stats.ttest_ind(a, b, equal_var=False).pvalue
  assert f"| polynorm | 1,000 | 6e+03 | 0.03 | {np.mean(a):.4f} ± {np.std(a, ddof=1):.4f} | 3 |" \
      in text and f"{p:.3g}" in text
  assert "sanity, SwiGLU ties or beats GELU: holds" in text
  assert "sanity, ReLU² beats GELU: holds" in text
  assert "polynorm vs swiglu: -0.1000 nats" in text
  assert os.path.exists(os.path.join(out, "lr_xs.png"))
  assert json.load(open(os.path.join(out, "runs.json")))[0]["key"]


def test_equal_arms_read_as_no_significant_difference():
  runs = lambda act, losses: [{"val_loss": v, "params": 1, "flops_per_token": 1.0, "lr": 1e-3,
                               "tokens_per_sec": 1.0, "wall_s": 1.0, "seed": i}
                              for i, v in enumerate(losses)]
  arms = {("s", "swiglu"): runs("swiglu", [2.0, 2.1, 1.9]),
          ("s", "polynorm"): runs("polynorm", [2.01, 2.12, 1.88])}
  [line] = sweep_report.outcome("s", arms, "swiglu")
  assert line.endswith("no significant difference.")


def test_baselines_and_one_real_run(corpus_glob, data_dir, tmp_path):
  """The baselines beat uniform bytes on the validation text, and a real tiny run trains, is
  evaluated and summarised (its held-out loss under the byte vocabulary's uniform log 258)."""
  base = _base(corpus_glob, data_dir)
  b = sweep_report.baselines(base, str(tmp_path))
  assert 0 < b["gzip"] < np.log(256) and 0 < b["unigram"] < np.log(258) and b["tokens"] > 0
  c = sweep.run_config(base, "xs", "polynorm", 3e-3, 0)
  assert c.train.num_steps == 10 and "experiment" not in c
  summary = sweep.train_and_summarise(c, str(tmp_path / "work"))
  assert 0 < summary["val_loss"] < np.log(258) + 1
  assert summary["curve"][-1]["eval_loss"] is not None and summary["coefficients"]
  assert sweep.run_key(c) != sweep.run_key(sweep.run_config(base, "xs", "polynorm", 1e-2, 0))


def test_a_stopped_run_is_not_cached(corpus_glob, data_dir, tmp_path, monkeypatch):
  """SIGTERM makes the loop save and return early: that run must not count as a result."""
  monkeypatch.setattr(sweep.loop, "train", lambda c, work: {"step": 3, "preempted": True})
  base, out = _base(corpus_glob, data_dir), str(tmp_path / "out")
  base.experiment.activations = ("swiglu",)
  todo, done = sweep.run_sweep(base, out)
  assert not done and len(todo) == 3 and not os.listdir(os.path.join(out, "cache"))


def test_a_time_budget_starts_no_run_that_would_end_past_it(corpus_glob, data_dir, tmp_path,
                                                            monkeypatch):
  """Runs of 100 fake seconds under a 250 s budget: two run (the third could end at 300 s),
  the report lists the rest, and every run saw the one compilation cache beside the results."""
  clock, caches, calls = [0.0], [], []
  fake = _fake_train(calls)

  def train(c, work):
    clock[0] += 100.0
    caches.append(os.environ.get(compile_cache.ENV))
    return fake(c, work)
  monkeypatch.setattr(sweep, "train_and_summarise", train)
  monkeypatch.setattr(sweep.time, "monotonic", lambda: clock[0])
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  base, out = _base(corpus_glob, data_dir), str(tmp_path / "out")
  todo, done = sweep.run_sweep(base, out, time_budget_s=250.0)
  assert len(done) == 2 and len(calls) == 2 and todo
  assert caches == [os.path.join(out, "compilation_cache")] * 2
  assert compile_cache.ENV not in os.environ                 # left as it was found
  row = todo[0][0]
  assert (f"- {row['size']} {row['activation']} lr {row['lr']:g} seed {row['seed']}"
          in open(os.path.join(out, "results.md")).read())
