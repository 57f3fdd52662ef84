"""Paper-style figures of an activation sweep: loss against tokens, learned coefficients."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"polynorm": "tab:red", "polyrelu": "tab:orange", "swiglu": "tab:blue",
          "gelu": "tab:green", "relu": "tab:purple", "relu2": "tab:brown", "silu": "tab:gray",
          "geglu": "tab:cyan"}


def ema(values: np.ndarray, alpha: float = 0.3) -> np.ndarray:
  """Exponential moving average (debiased), the usual smoothing of loss curves."""
  out, avg = np.empty(len(values)), 0.0
  for i, v in enumerate(values):
    avg = alpha * v + (1 - alpha) * avg
    out[i] = avg / (1 - (1 - alpha) ** (i + 1))
  return out


def _curves(runs, key, smooth):
  """activation -> (steps, [seeds, steps] values) on the steps every seed logged."""
  by_act: dict[str, list] = {}
  for r in runs:
    rec = [x for x in r["records"] if x.get(key) is not None]
    by_act.setdefault(r["activation"], []).append(
        {x["step"]: x[key] for x in rec})
  curves = {}
  for act, seeds in by_act.items():
    steps = sorted(set.intersection(*(set(s) for s in seeds)))
    values = np.array([[s[t] for t in steps] for s in seeds])
    curves[act] = (np.array(steps), np.array([ema(v) for v in values]) if smooth else values)
  return curves


def _loss_figure(runs, key, title, tokens_per_step, path, smooth):
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  for act, (steps, values) in sorted(_curves(runs, key, smooth).items()):
    tokens = steps * tokens_per_step
    mean = values.mean(0)
    ax.plot(tokens, mean, label=act, color=COLORS.get(act), lw=1.6)
    if len(values) > 1:
      ax.fill_between(tokens, values.min(0), values.max(0), color=COLORS.get(act), alpha=0.2)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  # The interesting part is the end: zoom on the last 70% of training.
  lo = [v.mean(0)[len(v[0]) * 3 // 10:] for _, v in _curves(runs, key, smooth).values()]
  if lo and all(len(x) for x in lo):
    ymin, ymax = min(x.min() for x in lo), max(x.max() for x in lo)
    ax.set_ylim(ymin - 0.05 * (ymax - ymin + 1e-9), ymax + 0.05 * (ymax - ymin + 1e-9))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _coefficient_figure(runs, tokens_per_step, path) -> bool:
  runs = [r for r in runs if r["coefficients"] and r["activation"] == "polynorm"
          and r["seed"] == min(x["seed"] for x in runs)]
  if not runs:
    return False
  rec = runs[0]["coefficients"]
  steps = np.array([x["step"] for x in rec]) * tokens_per_step
  values = np.array([x["layers"] for x in rec])                    # [logs, layers, r + 1]
  layers, r1 = values.shape[1], values.shape[2]
  names = [f"w{i} (x^{r1 - 1 - i})" for i in range(r1 - 1)] + ["bias"]
  fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), dpi=120, sharey=True)
  for layer, ax in enumerate(np.atleast_1d(axes)):
    for j in range(r1):
      ax.plot(steps, values[:, layer, j], label=names[j])
    ax.set_title(f"layer {layer}")
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel("coefficient")
  np.atleast_1d(axes)[-1].legend(fontsize=8)
  fig.suptitle("PolyNorm coefficients during training")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def comparison_figures(runs: list[dict], tokens_per_step: int, out: str) -> list[str]:
  """Writes the sweep's figures to `out`; returns their file names."""
  names = ["train_loss.png", "val_loss.png"]
  _loss_figure(runs, "loss", "Training loss (EMA-smoothed; band: seed range)",
               tokens_per_step, os.path.join(out, names[0]), smooth=True)
  _loss_figure(runs, "eval_loss", "Validation loss (band: seed range)", tokens_per_step,
               os.path.join(out, names[1]), smooth=False)
  if _coefficient_figure(runs, tokens_per_step, os.path.join(out, "polynorm_coefficients.png")):
    names.append("polynorm_coefficients.png")
  return names
