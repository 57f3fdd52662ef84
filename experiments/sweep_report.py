"""The sweep's report (experiments/sweep.py): per size, the final held-out loss of each activation
at its best learning rate (mean ± std over seeds), Welch's t-test against the reference, FLOPs,
tokens/s and wall-clock, the final PolyCom coefficients, the sanity orderings, the
learning-rate sensitivity, the unigram and gzip baselines on the same validation text, and what
is still to run."""

from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
from scipy import stats

from experiments import plotting
from polycom_jax import evaluation
from polycom_jax import model as model_lib
from polycom_jax import setup as setup_lib

# Orderings careful comparisons report (modded-nanogpt, llm.c PR 755, Shazeer 2020): a
# parameter-matched SwiGLU ties or beats GELU, and ReLU^2 beats GELU.
SANITY = (("swiglu", "gelu", "SwiGLU ties or beats GELU"), ("relu2", "gelu", "ReLU² beats GELU"))
ALPHA = 0.05


def sizes_by_params(base) -> list[str]:
  """The study's sizes, smallest model first (the cheap arms finish first)."""
  def params(size):
    c = base.model.copy_and_resolve_references()
    c.update(dict(base.experiment.sizes[size]), activation=base.experiment.reference)
    return model_lib.num_params(model_lib.ModelConfig.from_config(c))
  return sorted(base.experiment.sizes, key=params)


def final_runs(done: list[dict], seeds) -> dict[tuple[str, str], list[dict]]:
  """(size, activation) -> its runs at the chosen rate, one per seed: only arms whose seeds all
  finished (the comparison is made at the end of training, on complete arms)."""
  chosen = {}
  for r in done:
    if r["phase"] == "seeds":
      chosen[(r["size"], r["activation"])] = r["lr"]
  arms = {}
  for arm, lr in chosen.items():
    runs = [r for r in done if (r["size"], r["activation"]) == arm and r["lr"] == lr]
    if {r["seed"] for r in runs} >= set(seeds):
      arms[arm] = sorted(runs, key=lambda r: r["seed"])
  return arms


def welch_p(a, b) -> float | None:
  """Two-sided p-value of Welch's t-test (unequal variances); None below 2 values a side."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2 or len(b) < 2:
    return None
  return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _losses(runs) -> np.ndarray:
  return np.array([math.inf if r["val_loss"] is None else r["val_loss"] for r in runs])


def _mean_std(v) -> str:
  v = np.asarray(v, float)
  return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"


def _coefficients(runs) -> str:
  """Final PolyCom weights (highest power first) and bias, averaged over layers and seeds."""
  finals = [r["coefficients"][-1]["layers"] for r in runs if r.get("coefficients")]
  if not finals:
    return ""
  mean = np.mean(np.asarray(finals, float), axis=(0, 1))      # [r + 1]: weights, then bias
  return "w=(" + ", ".join(f"{w:.2f}" for w in mean[:-1]) + f"), b={mean[-1]:.2f}"


def size_table(size: str, arms: dict, reference: str) -> str:
  rows = sorted(((act, runs) for (s, act), runs in arms.items() if s == size),
                key=lambda kv: _losses(kv[1]).mean())
  ref = arms.get((size, reference))
  lines = [f"| activation | params | FLOPs/token | lr | val loss (mean ± std) | seeds | "
           f"Δ vs {reference} | Welch p | tokens/s | wall s/run (median) | PolyCom coefficients |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
  for act, runs in rows:
    losses = _losses(runs)
    delta = p = ""
    if ref is not None and act != reference:
      delta = f"{losses.mean() - _losses(ref).mean():+.4f}"
      pv = welch_p(losses, _losses(ref))
      p = "" if pv is None else f"{pv:.3g}"
    lines.append(f"| {act} | {runs[0]['params']:,} | {runs[0]['flops_per_token']:.3g} | "
                 f"{runs[0]['lr']:g} | {_mean_std(losses)} | {len(runs)} | {delta} | {p} | "
                 f"{np.mean([r['tokens_per_sec'] or 0 for r in runs]):,.0f} | "
                 f"{np.median([r['wall_s'] for r in runs]):.0f} | {_coefficients(runs)} |")
  return "\n".join(lines)


def outcome(size: str, arms: dict, reference: str) -> list[str]:
  """Plain sentences: each activation against the reference, then the sanity orderings."""
  out = []
  ref = arms.get((size, reference))
  for (s, act), runs in sorted(arms.items()):
    if s != size or act == reference or ref is None:
      continue
    d = _losses(runs).mean() - _losses(ref).mean()
    p = welch_p(_losses(runs), _losses(ref))
    if p is None or p >= ALPHA:
      verdict = "no significant difference"
    else:
      verdict = "lower (better)" if d < 0 else "higher (worse)"
    p_text = "n/a" if p is None else f"{p:.3g}"
    out.append(f"- {act} vs {reference}: {d:+.4f} nats, p = {p_text}: {verdict}.")
  for better, worse, text in SANITY:
    a, b = arms.get((size, better)), arms.get((size, worse))
    if a is None or b is None:
      continue
    d = _losses(a).mean() - _losses(b).mean()
    p = welch_p(_losses(a), _losses(b))
    holds = d <= 0 if better == "swiglu" else d < 0
    out.append(f"- sanity, {text}: {'holds' if holds else 'does NOT hold'} "
               f"({better} - {worse} = {d:+.4f}, p = {'n/a' if p is None else f'{p:.3g}'}).")
  return out


def lr_table(size: str, done: list[dict], seed: int) -> str:
  """Held-out loss of every swept rate (the sweep's seed): the sensitivity of each activation."""
  sweep = [r for r in done if r["size"] == size and r["seed"] == seed and r["phase"] == "lr sweep"]
  lrs = sorted({r["lr"] for r in sweep})
  acts = sorted({r["activation"] for r in sweep})
  lines = ["| activation | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
           "|---|" + "---:|" * len(lrs)]
  for act in acts:
    cell = {r["lr"]: r["val_loss"] for r in sweep if r["activation"] == act}
    lines.append(f"| {act} | " + " | ".join(
        "" if lr not in cell else "diverged" if cell[lr] is None else f"{cell[lr]:.4f}"
        for lr in lrs) + " |")
  return "\n".join(lines)


def baselines(base, out: str) -> dict:
  """Unigram and gzip cross-entropy (nats/token) on the validation text the models are scored
  on, computed once per data config (OUT/baselines.json)."""
  path = os.path.join(out, "baselines.json")
  key = json.dumps({"data": base.data.to_dict(), "eval": base.eval.to_dict()}, sort_keys=True,
                   default=str)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      return cached
  c = base.copy_and_resolve_references()
  with c.unlocked():                    # the loaded config is locked
    del c.experiment
  s = setup_lib.setup(c)
  unigram = evaluation.unigram_loss(s, num_train_batches=64, eval_max_batches=c.eval.max_batches)
  targets = [b["targets"][b["loss_mask"] > 0] for b in evaluation.eval_batches(
      s, c.eval.max_batches, c.eval.batch_size)]
  ids = np.concatenate(targets)
  result = {"key": key, "unigram": float(unigram), "tokens": int(len(ids))}
  if c.data.tokenizer == "byte":         # one token per byte: gzip's bits are per token
    text = bytes(int(i) for i in ids if i < 256)
    result["gzip"] = 8 * len(gzip.compress(text, 9)) * math.log(2) / len(text)
  with open(path, "w") as f:
    json.dump(result, f)
  return result


def write(base, done: list[dict], todo: list[tuple], out: str, command: str):
  """OUT/results.md, OUT/runs.json and the figures, from the runs finished so far."""
  exp = base.experiment
  arms = final_runs(done, exp.seeds)
  sizes = sizes_by_params(base)
  base_line = baselines(base, out)
  parts = [f"# Activation comparison: {exp.title}\n", f"`{command}`\n",
           f"Protocol: [experiments/PROTOCOL.md](../../PROTOCOL.md). Held-out loss in nats per "
           f"token on {base_line['tokens']:,} validation tokens, after {exp.tokens_per_param:g} "
           f"tokens per parameter. Baselines on the same text: unigram "
           f"{base_line['unigram']:.4f}" + (f", gzip -9 {base_line['gzip']:.4f}"
                                             if "gzip" in base_line else "") + ".\n"]
  for size in sizes:
    parts.append(f"## {size}: {dict(exp.sizes[size])}\n")
    if any(s == size for s, _ in arms):
      parts += [size_table(size, arms, exp.reference), "", *outcome(size, arms, exp.reference),
                ""]
    else:
      parts.append("No arm has finished all its seeds yet.\n")
    if any(r["size"] == size for r in done):
      parts += [f"Learning-rate sweep (seed {exp.seeds[0]}, held-out loss):\n",
                lr_table(size, done, exp.seeds[0]), ""]
  figures = plotting.sweep_figures(done, arms, exp, out)
  parts.append("\n".join(f"![{name}]({name})" for name in figures) + "\n")
  if todo:
    parts.append(f"## Not finished\n\n{len(done)} runs done; next to run ({len(todo)} known "
                 "now; each arm's seeds follow its finished learning-rate sweep): "
                 f"`{command}` runs them.\n")
    parts += [f"- {r['size']} {r['activation']} lr {r['lr']:g} seed {r['seed']} ({r['phase']})"
              for r, _ in todo[:40]]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(parts) + "\n")
  with open(os.path.join(out, "runs.json"), "w") as f:
    json.dump([{k: v for k, v in r.items() if k not in ("curve", "coefficients")} for r in done],
              f, indent=1)
