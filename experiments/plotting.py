"""Figures of the activation sweep (experiments/sweep.py): held-out loss against tokens with
seed bands, loss against learning rate and against model size, learned coefficients."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"polynorm": "tab:red", "polyrelu": "tab:orange", "swiglu": "tab:blue",
          "gelu": "tab:green", "relu": "tab:purple", "relu2": "tab:brown", "silu": "tab:gray",
          "geglu": "tab:cyan", "polynorm_glu": "tab:pink", "polyrelu_glu": "tab:olive"}


def ema(values: np.ndarray, alpha: float = 0.3) -> np.ndarray:
  """Exponential moving average (debiased), the usual smoothing of loss curves."""
  out, avg = np.empty(len(values)), 0.0
  for i, v in enumerate(values):
    avg = alpha * v + (1 - alpha) * avg
    out[i] = avg / (1 - (1 - alpha) ** (i + 1))
  return out


def _curves(runs, key, smooth):
  """activation -> (tokens, [seeds, points] values) on the steps every seed logged."""
  by_act: dict[str, list] = {}
  for r in runs:
    per_step = r["tokens"] / r["steps"]
    by_act.setdefault(r["activation"], []).append(
        {x["step"] * per_step: x[key] for x in r["curve"] if x.get(key) is not None})
  curves = {}
  for act, seeds in by_act.items():
    tokens = sorted(set.intersection(*(set(s) for s in seeds)))
    values = np.array([[s[t] for t in tokens] for s in seeds])
    curves[act] = (np.array(tokens), np.array([ema(v) for v in values]) if smooth else values)
  return curves


def _loss_figure(runs, key, title, path, smooth):
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  curves = _curves(runs, key, smooth)
  for act, (tokens, values) in sorted(curves.items()):
    if not len(tokens):
      continue
    ax.plot(tokens, values.mean(0), label=act, color=COLORS.get(act), lw=1.6)
    if len(values) > 1:
      ax.fill_between(tokens, values.min(0), values.max(0), color=COLORS.get(act), alpha=0.2)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  # The interesting part is the end: zoom on the last 70% of training.
  lo = [v.mean(0)[len(v[0]) * 3 // 10:] for _, v in curves.values() if v.size]
  if lo and all(len(x) for x in lo):
    ymin, ymax = min(x.min() for x in lo), max(x.max() for x in lo)
    ax.set_ylim(ymin - 0.05 * (ymax - ymin + 1e-9), ymax + 0.05 * (ymax - ymin + 1e-9))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _lr_figure(sweep, title, path):
  """Final held-out loss against the learning rate, one line per activation."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for act in sorted({r["activation"] for r in sweep}):
    pts = sorted((r["lr"], r["val_loss"]) for r in sweep
                 if r["activation"] == act and r["val_loss"] is not None)
    if pts:
      ax.plot(*zip(*pts), "o-", label=act, color=COLORS.get(act))
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("held-out loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _size_figure(arms, path) -> bool:
  """Final held-out loss (mean, seed range) against parameters, per activation (dense sizes)."""
  by_act: dict[str, list] = {}
  for (size, act), runs in arms.items():
    if not size.startswith("moe"):
      losses = [r["val_loss"] for r in runs if r["val_loss"] is not None]
      if losses:
        by_act.setdefault(act, []).append((runs[0]["params"], np.mean(losses), min(losses),
                                           max(losses)))
  if not any(len(v) > 1 for v in by_act.values()):
    return False
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for act, pts in sorted(by_act.items()):
    n, mean, lo, hi = map(np.array, zip(*sorted(pts)))
    ax.errorbar(n, mean, yerr=[mean - lo, hi - mean], fmt="o-", label=act,
                color=COLORS.get(act), capsize=3)
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("held-out loss (nats/token)")
  ax.set_title("Loss against model size (bars: seed range)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def _coefficient_figure(run, path) -> bool:
  rec = run.get("coefficients")
  if not rec:
    return False
  per_step = run["tokens"] / run["steps"]
  tokens = np.array([x["step"] for x in rec]) * per_step
  values = np.array([x["layers"] for x in rec])                    # [logs, layers, r + 1]
  layers, r1 = values.shape[1], values.shape[2]
  names = [f"w{i} (x^{r1 - 1 - i})" for i in range(r1 - 1)] + ["bias"]
  fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), dpi=120, sharey=True)
  for layer, ax in enumerate(np.atleast_1d(axes)):
    for j in range(r1):
      ax.plot(tokens, values[:, layer, j], label=names[j])
    ax.set_title(f"layer {layer}")
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel("coefficient")
  np.atleast_1d(axes)[-1].legend(fontsize=8)
  fig.suptitle(f"{run['activation']} coefficients during training ({run['size']}, seed "
               f"{run['seed']})")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def sweep_figures(done: list[dict], arms: dict, exp, out: str) -> list[str]:
  """Writes the sweep's figures to `out` (experiments/sweep.py); returns their file names."""
  names = []
  for size in exp.sizes:
    runs = [r for arm, rs in arms.items() if arm[0] == size for r in rs]
    if runs:
      names.append(f"val_loss_{size}.png")
      _loss_figure(runs, "eval_loss", f"{size}: held-out loss (band: seed range)",
                   os.path.join(out, names[-1]), smooth=False)
    sweep = [r for r in done if r["size"] == size and r["phase"] == "lr sweep"]
    if sweep:
      names.append(f"lr_{size}.png")
      _lr_figure(sweep, f"{size}: learning-rate sensitivity (seed {exp.seeds[0]})",
                 os.path.join(out, names[-1]))
  if _size_figure(arms, os.path.join(out, "loss_vs_size.png")):
    names.append("loss_vs_size.png")
  poly = [r for arm, rs in arms.items() if arm[1] == "polynorm" for r in rs]
  if poly and _coefficient_figure(max(poly, key=lambda r: (r["params"], -r["seed"])),
                                  os.path.join(out, "polynorm_coefficients.png")):
    names.append("polynorm_coefficients.png")
  return names
