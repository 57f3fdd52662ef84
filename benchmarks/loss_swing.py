"""How much the logged training loss swings in the second half of a run (batch-order noise).

  python -m benchmarks.loss_swing WORKDIR [WORKDIR ...] [--from_step=300] [--to_step=600]

Per workdir (metrics.jsonl): max/min of the logged train loss over the steps, the mean
|change of log loss| between consecutive logged points, and the last logged eval loss. With
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
  losses = [r["loss"] for r in records if start <= r["step"] <= stop]
  logs = [math.log(v) for v in losses]
  evals = [r for r in records if "eval_loss" in r]
  return {"max_over_min": max(losses) / min(losses),
          "mean_abs_dlog": sum(abs(b - a) for a, b in zip(logs, logs[1:])) / (len(logs) - 1),
          "points": len(losses), "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
          "last_eval_step": evals[-1]["step"] if evals else None}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--from_step", type=int, default=300)
  parser.add_argument("--to_step", type=int, default=600)
  args = parser.parse_args()
  print("| workdir | max/min train loss | mean abs d(log loss) | logged points | last eval loss |")
  print("|---|---:|---:|---:|---:|")
  for w in args.workdirs:
    r = swing(w, args.from_step, args.to_step)
    ev = f"{r['last_eval_loss']:.4f} (step {r['last_eval_step']})" if r["last_eval_loss"] else "-"
    print(f"| {w} | {r['max_over_min']:.3f} | {r['mean_abs_dlog']:.4f} | {r['points']} | {ev} |")


if __name__ == "__main__":
  main()
