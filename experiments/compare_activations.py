"""Train the same parameter-matched model with each activation and seed; tabulate and plot.

  python -m experiments.compare_activations --config=configs/compare_small.py \
      --out=experiments/results/small [--config.train.num_steps=...]

"train loss" is the mean logged loss over the last 10% of steps. Each (activation, seed) run
has its own workdir under OUT/runs and resumes if interrupted, so
the command can be rerun to finish or extend a sweep. Writes OUT/results.md (final train loss,
validation loss and perplexity, mean +- std over seeds, parameters, tokens/s) and PNG figures
of train and validation loss against tokens, and of the learned PolyCom coefficients.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import plotting
from polycom_jax import downstream, evaluation, loop, model as model_lib
from polycom_jax.config_errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/compare_small.py", "Sweep config.")
_OUT = flags.DEFINE_string("out", "experiments/results/small", "Output directory.")


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_one(config, activation: str, seed: int, out: str, tasks: list) -> dict:
  """Trains (or finishes) one run and evaluates its final checkpoint (and downstream tasks)."""
  c = config.copy_and_resolve_references()
  c.model.activation = activation
  c.seed = seed
  c.data.shuffle_seed = seed
  workdir = os.path.join(out, "runs", f"{activation}_seed{seed}")
  loop.train(c, workdir)
  ev = evaluation.evaluate_checkpoint(c, workdir, with_unigram=False)
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  downstream_acc = {}
  if tasks:
    results = downstream.evaluate_checkpoint(c, workdir, None, tasks)["tasks"]
    downstream_acc = {name: r["acc_norm"] for name, r in results.items()}
  return {"downstream": downstream_acc,"activation": activation, "seed": seed, "workdir": workdir,
          "params": model_lib.num_params(model_lib.ModelConfig.from_config(c.model)),
          "train_loss": float(np.mean([r["loss"] for r in records
                                       if r["step"] > 0.9 * c.train.num_steps])),
          "val_loss": ev["loss"],
          "val_perplexity": ev["perplexity"], "bits_per_byte": ev.get("bits_per_byte"),
          "tokens_per_sec": float(np.median([r["tokens_per_sec"] for r in records
                                             if r["tokens_per_sec"]])),
          "records": records,
          "coefficients": read_jsonl(os.path.join(workdir, "coefficients.jsonl"))}


def _mean_std(values) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"


def results_table(runs: list[dict]) -> str:
  """Markdown: one row per activation, sorted by validation loss."""
  by_act: dict[str, list[dict]] = {}
  for r in runs:
    by_act.setdefault(r["activation"], []).append(r)
  rows = sorted(by_act.items(), key=lambda kv: np.mean([r["val_loss"] for r in kv[1]]))
  task_names = sorted(runs[0]["downstream"])
  lines = ["| activation | train loss | val loss | val perplexity | bits/byte | params | "
           "tokens/s | seeds |" + "".join(f" {t} acc_norm |" for t in task_names),
           "|---|---|---|---|---|---|---|---|" + "---|" * len(task_names)]
  for act, rs in rows:
    bpb = [r["bits_per_byte"] for r in rs if r["bits_per_byte"] is not None]
    lines.append(
        f"| {act} | {_mean_std([r['train_loss'] for r in rs])} | "
        f"{_mean_std([r['val_loss'] for r in rs])} | "
        f"{_mean_std([r['val_perplexity'] for r in rs])} | "
        f"{_mean_std(bpb) if bpb else 'n/a'} | {rs[0]['params']:,} | "
        f"{np.mean([r['tokens_per_sec'] for r in rs]):,.0f} | {len(rs)} |"
        + "".join(f" {_mean_std([r['downstream'][t] for r in rs])} |" for t in task_names))
  return "\n".join(lines)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config, out = _CONFIG.value, _OUT.value
  os.makedirs(out, exist_ok=True)
  try:
    exp = config.experiment
    tasks = (downstream.load_tasks(exp.tasks, exp.tasks_data_dir or config.data.data_dir,
                                   exp.tasks_limit) if exp.tasks else [])
    runs = [run_one(config, act, seed, out, tasks)
            for act in exp.activations for seed in exp.seeds]
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  figures = plotting.comparison_figures(runs, tokens_per_step, out)
  table = results_table(runs)
  command = " ".join(["python -m experiments.compare_activations", *sys.argv[1:]])
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# Activation comparison\n\n`{command}`\n\n{table}\n\n")
    f.write("\n".join(f"![{name}]({name})" for name in figures) + "\n")
  with open(os.path.join(out, "runs.json"), "w") as f:
    json.dump([{k: v for k, v in r.items() if k not in ("records", "coefficients")}
               for r in runs], f, indent=2)
  print(table)
  print(f"written to {out}/results.md with {', '.join(figures)}")


if __name__ == "__main__":
  app.run(main)
