"""How much the logged training loss swings in the second half of a run (batch-order noise).

  python -m benchmarks.loss_swing WORKDIR [WORKDIR ...] [--from_step=300] [--to_step=600]

Per workdir (metrics.jsonl): max/min of the logged train loss over the steps, the same after
removing the straight-line trend of log(loss) (the model still learns over these steps) and the
residuals' std, the mean |change of log loss| between consecutive logged points, and the last
logged eval loss. With
i.i.d. batches of 16 rows of this corpus the per-batch loss std is ~6.5% and max/min over 15
batches 1.2-1.3 (measured on a trained model); larger swings are the data order's.
"""

import argparse
import json
import math
import os


def swing(workdir: str, start: int, stop: int) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  points = [(r["step"], r["loss"]) for r in records if start <= r["step"] <= stop]
  steps, losses = zip(*points)
  logs = [math.log(v) for v in losses]
  evals = [r for r in records if "eval_loss" in r]
  # The loss also falls over these steps (learning, lr decay): the residuals of a straight
  # line through log(loss) are the batch-to-batch noise alone.
  n, mean_s, mean_l = len(logs), sum(steps) / len(steps), sum(logs) / len(logs)
  slope = (sum((s - mean_s) * (l - mean_l) for s, l in zip(steps, logs))
           / sum((s - mean_s) ** 2 for s in steps))
  resid = [l - mean_l - slope * (s - mean_s) for s, l in zip(steps, logs)]
  return {"max_over_min": max(losses) / min(losses),
          "detrended_max_over_min": math.exp(max(resid) - min(resid)),
          "detrended_std": math.sqrt(sum(r * r for r in resid) / (n - 2)),
          "mean_abs_dlog": sum(abs(b - a) for a, b in zip(logs, logs[1:])) / (len(logs) - 1),
          "points": len(losses), "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
          "last_eval_step": evals[-1]["step"] if evals else None}


def iid_reference(config_path: str, workdir: str, step: int, batches: int = 15,
                  seeds: int = 20) -> dict:
  """The same statistics for i.i.d. batches: the step's checkpoint scored on `batches` batches
  of global_batch_size rows drawn uniformly from the prepared training rows (one fixed model, so
  only the batch draw varies), for `seeds` draws: mean max/min and mean per-batch std."""
  import importlib.util
  import jax
  import numpy as np
  from polycom_jax import evaluation, steps
  from polycom_jax.data import prepared
  spec = importlib.util.spec_from_file_location("config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  s, params, step = evaluation.restore_params(config, workdir, step)
  rows = prepared.open_rows(config.data, s.tokenizer, "train")
  eval_step = steps.make_eval_step(s)
  b = config.train.global_batch_size
  ratios, stds = [], []
  with jax.set_mesh(s.mesh):
    for seed in range(seeds):
      rng = np.random.default_rng(seed)
      losses = []
      for _ in range(batches):
        picked = [rows[int(i)] for i in rng.integers(0, len(rows), b)]
        batch = {k: np.stack([r[k] for r in picked]) for k in picked[0]}
        out = jax.device_get(eval_step(params, steps.global_batch(s, batch)))
        losses.append(float(out["nll"]) / float(out["tokens"]))
      ratios.append(max(losses) / min(losses))
      stds.append(float(np.std(losses) / np.mean(losses)))
  return {"step": step, "max_over_min": float(np.mean(ratios)), "std": float(np.mean(stds))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--from_step", type=int, default=300)
  parser.add_argument("--to_step", type=int, default=600)
  parser.add_argument("--iid_config", default="", help="also score i.i.d. batches with the "
                      "first workdir's checkpoint at --iid_step (config file of that run)")
  parser.add_argument("--iid_step", type=int, default=400)
  args = parser.parse_args()
  if args.iid_config:
    r = iid_reference(args.iid_config, args.workdirs[0], args.iid_step)
    print(f"i.i.d. batches, step-{r['step']} model of {args.workdirs[0]}, 15 batches x 20 draws: "
          f"max/min {r['max_over_min']:.3f}, per-batch std {r['std']:.1%}")
  print("| workdir | max/min train loss | detrended max/min | detrended std | "
        "mean abs d(log loss) | logged points | last eval loss |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for w in args.workdirs:
    r = swing(w, args.from_step, args.to_step)
    ev = f"{r['last_eval_loss']:.4f} (step {r['last_eval_step']})" if r["last_eval_loss"] else "-"
    print(f"| {w} | {r['max_over_min']:.3f} | {r['detrended_max_over_min']:.3f} | "
          f"{r['detrended_std']:.1%} | {r['mean_abs_dlog']:.4f} | {r['points']} | {ev} |")


if __name__ == "__main__":
  main()
