"""The activation comparison under the protocol of experiments/PROTOCOL.md: per model size and
activation, a learning-rate sweep on one seed, the best rate picked on held-out loss, then more
seeds at that rate; a small MoE the same way; a report with error bars, Welch t-tests against the
reference activation, sanity orderings, baselines and figures.

  python -m experiments.sweep --config=configs/sweep_cpu.py --out=experiments/results/sweep_cpu
  python -m experiments.sweep --config=configs/sweep_gpu.py --out=$OUT/sweep_gpu     # one H200
  [--max_runs=N]   stop after N new runs (the sweep finishes over several sittings)
  [--time_budget_s=S]  start no run that would end past S seconds from the start, judged by
                   the longest run of this sitting (a lent machine's time limit)
  [--plan]         list the runs still to do, with their cache keys, and train nothing

Resumable: every run's summary is cached under OUT/cache/<key>.json, the key a hash of the run's
full training config; a rerun trains only what is missing (an interrupted run restarts). The
report (OUT/results.md, OUT/*.png, OUT/runs.json) is rewritten from the cache after every run,
so it always shows what has finished and lists what has not. All runs share one compilation
cache, OUT/compilation_cache (unless POLYCOM_COMPILATION_CACHE says otherwise): a run that differs
from an earlier one only in its seed loads the compiled train and eval steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import sweep_report
from polycom_jax import compile_cache, evaluation, loop, model as model_lib
from polycom_jax.config_errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sweep_cpu.py", "Sweep config.")
_OUT = flags.DEFINE_string("out", "experiments/results/sweep_cpu", "Output directory.")
_MAX_RUNS = flags.DEFINE_integer("max_runs", 0, "Stop after this many new runs (0: all).")
_TIME_BUDGET = flags.DEFINE_float(
    "time_budget_s", 0.0, "Start no run that would end past this many seconds from the start, "
    "judged by the longest run so far (0: no limit).")
_PLAN = flags.DEFINE_bool("plan", False, "Only list the runs still to do.")


# ------------------------------------------------------------------------------------------------
# One run: its config, key and cached summary

def run_config(base: ml_collections.ConfigDict, size: str, activation: str, lr: float,
               seed: int) -> ml_collections.ConfigDict:
  """The training config of one run: the size's model, the activation, the rate and the seed;
  steps from the size's parameter count and config.experiment.tokens_per_param."""
  exp = base.experiment
  c = base.copy_and_resolve_references()
  with c.unlocked():                    # the loaded config is locked
    del c.experiment
  c.model.update(dict(exp.sizes[size]))
  c.model.activation = activation
  c.seed = c.data.shuffle_seed = seed
  params = model_lib.num_params(model_lib.ModelConfig.from_config(c.model))
  tokens_per_step = c.train.global_batch_size * c.data.seq_len
  steps = max(10, math.ceil(exp.tokens_per_param * params / tokens_per_step))
  c.train.update(learning_rate=lr, min_learning_rate=lr * exp.min_lr_fraction, num_steps=steps,
                 warmup_steps=max(1, int(exp.warmup_fraction * steps)),
                 eval_every=max(1, steps // exp.evals_per_run), checkpoint_every=0)
  return c


def run_key(c: ml_collections.ConfigDict) -> str:
  """A hash of the whole training config: a changed setting is a new run."""
  text = json.dumps(c.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class RunStopped(Exception):
  """The run ended before its last step (preempted, halted): it is not a result."""


def train_and_summarise(c: ml_collections.ConfigDict, work: str) -> dict:
  """Trains one run from scratch in `work`, evaluates its last checkpoint on the held-out split,
  and returns what the report needs (the workdir is then deleted; the summary keeps the curves)."""
  shutil.rmtree(work, ignore_errors=True)
  t0 = time.perf_counter()
  last = loop.train(c, work)
  wall = time.perf_counter() - t0
  if last.get("preempted") or last["step"] < c.train.num_steps:
    raise RunStopped(f"stopped at step {last['step']} of {c.train.num_steps}; not cached")
  records = _read_jsonl(os.path.join(work, "metrics.jsonl"))
  try:
    val = evaluation.evaluate_checkpoint(c, work, with_unigram=False)["loss"]
  except (ConfigError, FileNotFoundError):   # diverged and halted, or nothing saved
    val = float("nan")
  mc = model_lib.ModelConfig.from_config(c.model)
  rates = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
  return {
      "val_loss": float(val) if math.isfinite(val) else None,
      "train_loss": float(last["loss"]) if math.isfinite(last.get("loss", math.nan)) else None,
      "steps": int(c.train.num_steps), "tokens": int(c.train.num_steps *
                                                    c.train.global_batch_size * c.data.seq_len),
      "params": model_lib.num_params(mc),
      "flops_per_token": model_lib.flops_per_token(mc, c.data.seq_len),
      "tokens_per_sec": float(np.median(rates)) if rates else None, "wall_s": wall,
      "curve": [{"step": r["step"], "loss": r.get("loss"), "eval_loss": r.get("eval_loss")}
                for r in records],
      "coefficients": _read_jsonl(os.path.join(work, "coefficients.jsonl")),
  }


class Cache:
  """OUT/cache/<key>.json per finished run: {"config": the training config, "summary": ...}."""

  def __init__(self, out: str):
    self.dir = os.path.join(out, "cache")
    os.makedirs(self.dir, exist_ok=True)

  def get(self, key: str) -> dict | None:
    path = os.path.join(self.dir, f"{key}.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)["summary"]

  def put(self, key: str, c: ml_collections.ConfigDict, summary: dict):
    path = os.path.join(self.dir, f"{key}.json")
    with open(path + ".tmp", "w") as f:
      json.dump({"config": c.to_dict(), "summary": summary}, f)
    os.replace(path + ".tmp", path)           # a run is cached whole or not at all


# ------------------------------------------------------------------------------------------------
# The protocol: which runs, in which order

def lr_grid(exp, found: dict[float, float | None]) -> list[float]:
  """The rates to try: the configured grid, extended by one factor past an edge while the best
  finished rate sits on that edge (at most exp.max_lr_extensions times each way)."""
  grid = sorted(exp.learning_rates)
  factor = exp.lr_factor
  for _ in range(exp.max_lr_extensions):
    done = {lr: v for lr, v in found.items() if lr in grid}
    if len(done) < len(grid):
      break                                   # the current grid is not finished yet
    best = best_lr(done)
    if best == grid[0]:
      grid.insert(0, _round(grid[0] / factor))
    elif best == grid[-1]:
      grid.append(_round(grid[-1] * factor))
    else:
      break
  return grid


def _round(lr: float) -> float:
  return float(f"{lr:.3g}")


def best_lr(found: dict[float, float | None]) -> float:
  """The rate with the lowest held-out loss (a diverged run counts as infinite)."""
  return min(found, key=lambda lr: (found[lr] is None, found[lr] or 0.0, lr))


def arms(base) -> list[tuple[str, str]]:
  """(size, activation) pairs of the study, smallest model first (a sitting that stops early
  leaves whole sizes, dense or MoE, compared): each dense size with every activation, each MoE
  size with the MoE activations."""
  exp = base.experiment
  return [(size, act) for size in sweep_report.sizes_by_params(base)
          for act in (exp.moe_activations if size.startswith("moe") else exp.activations)]


def plan(base, cache: Cache) -> tuple[list[tuple], list[dict]]:
  """(runs still to do, finished runs), following the protocol as far as the cache allows: an
  arm's seeds wait for its learning-rate sweep."""
  exp = base.experiment
  todo, done = [], []

  def visit(size, act, lr, seed, phase):
    c = run_config(base, size, act, lr, seed)
    key = run_key(c)
    summary = cache.get(key)
    row = {"size": size, "activation": act, "lr": lr, "seed": seed, "phase": phase, "key": key}
    if summary is None:
      todo.append((row, c))
    else:
      done.append({**row, **summary})
    return summary

  for size, act in arms(base):
    found, pending = {}, False
    for lr in lr_grid(exp, {}):
      s = visit(size, act, lr, exp.seeds[0], "lr sweep")
      pending |= s is None
      found[lr] = None if s is None else s["val_loss"]
    while not pending:                         # extend past an edge once the grid is finished
      grid = lr_grid(exp, found)
      new = [lr for lr in grid if lr not in found]
      if not new:
        break
      for lr in new:
        s = visit(size, act, lr, exp.seeds[0], "lr sweep")
        pending |= s is None
        found[lr] = None if s is None else s["val_loss"]
    if pending:
      continue
    lr = best_lr(found)
    for seed in exp.seeds[1:]:
      visit(size, act, lr, seed, "seeds")
  return todo, done


def run_sweep(base, out: str, max_runs: int = 0, command: str = "",
              time_budget_s: float = 0.0) -> tuple[list, list]:
  """Runs what the protocol still needs (at most max_runs new runs, 0: all; none that would end
  past time_budget_s seconds from now, 0: no limit), rewriting the report after each; returns
  (runs still to do, finished runs)."""
  # Each run's workdir is deleted after it, and its compilation cache with it unless the cache
  # lives beside the results; runs that differ only in their seed compile the same steps.
  ours = compile_cache.ENV not in os.environ
  if ours:
    os.environ[compile_cache.ENV] = os.path.join(out, "compilation_cache")
  try:
    return _run_sweep(base, out, max_runs, command, time_budget_s)
  finally:
    if ours:
      del os.environ[compile_cache.ENV]


def _run_sweep(base, out, max_runs, command, time_budget_s):
  cache, ran, start, longest = Cache(out), 0, time.monotonic(), 0.0
  while True:
    todo, done = plan(base, cache)
    sweep_report.write(base, done, todo, out, command)
    if not todo or (max_runs and ran >= max_runs):
      return todo, done
    if time_budget_s and time.monotonic() - start + longest > time_budget_s:
      print(f"stopping: the next run could end past the {time_budget_s:g} s budget "
            f"(the longest so far took {longest:.0f} s); the same command resumes", flush=True)
      return todo, done
    row, c = todo[0]
    print(f"run {row['size']} {row['activation']} lr {row['lr']:g} seed {row['seed']} "
          f"({c.train.num_steps} steps)", flush=True)
    work = os.path.join(out, "work", row["key"])
    run_start = time.monotonic()
    try:
      summary = train_and_summarise(c, work)
    except RunStopped as e:           # SIGTERM: the loop saved and returned; a rerun redoes it
      print(f"{row['key']}: {e}", flush=True)
      return todo, done
    cache.put(row["key"], c, summary)
    shutil.rmtree(work, ignore_errors=True)
    ran, longest = ran + 1, max(longest, time.monotonic() - run_start)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  base, out = _CONFIG.value, _OUT.value
  try:
    if _PLAN.value:
      todo, done = plan(base, Cache(out))
      print(f"{len(done)} runs finished, {len(todo)} to do next (more follow once each arm's "
            "learning-rate sweep is finished):")
      for row, c in todo:
        print(f"  {row['size']:>6} {row['activation']:<13} lr {row['lr']:<8g} seed "
              f"{row['seed']}  {c.train.num_steps} steps ({row['phase']}, key {row['key']})")
      return
    todo, done = run_sweep(base, out, _MAX_RUNS.value,
                           " ".join(["python -m experiments.sweep", *sys.argv[1:]]),
                           _TIME_BUDGET.value)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{len(done)} runs finished, {len(todo)} to do; report in {out}/results.md")


if __name__ == "__main__":
  app.run(main)
