"""How well do one-hidden-layer MLPs of each activation fit smooth functions, per parameter?

The paper's theory says PolyReLU/PolyNorm networks approximate smooth functions with fewer
parameters than ReLU-family ones. This fits a few targets on [-1, 1]^d with MLPs
  y = W2 act(W1 x + b1) + b2            (gated: y = W2 (act(Wg x + bg) * (W1 x + b1)) + b2)
of several widths (full-batch Adam, 3 seeds, best of the seeds), and plots test error against
the parameter count.

  python -m experiments.function_approximation --out=experiments/results
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags

from polycom_jax import activations

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_OUT = flags.DEFINE_string("out", "experiments/results", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Adam steps per fit.")

ACTIVATIONS = ("polynorm", "polyrelu", "relu", "gelu", "relu2", "swiglu")
WIDTHS = (4, 8, 16, 32)
SEEDS = (0, 1, 2)
TARGETS = {
    "x^3 - x/2 (1-D)": (1, lambda x: x[:, 0] ** 3 - 0.5 * x[:, 0]),
    "sin(3x) (1-D)": (1, lambda x: jnp.sin(3 * x[:, 0])),
    "x * y (2-D)": (2, lambda x: x[:, 0] * x[:, 1]),
}


def init(key, name: str, dim: int, width: int) -> dict:
  act = activations.get(name)
  k1, k2, k3 = jax.random.split(key, 3)
  p = {"w1": jax.random.normal(k1, (dim, width)) / np.sqrt(dim), "b1": jnp.zeros(width),
       "w2": jax.random.normal(k2, (width, 1)) / np.sqrt(width), "b2": jnp.zeros(1)}
  if act.gated:
    p["wg"] = jax.random.normal(k3, (dim, width)) / np.sqrt(dim)
    p["bg"] = jnp.zeros(width)
  if act.has_params:
    p["cw"], p["cb"] = jnp.full((3,), 1 / 3), jnp.zeros(1)
  return p


def forward(p: dict, name: str, x: jax.Array) -> jax.Array:
  h = x @ p["w1"] + p["b1"]                                       # [N, width]
  act = activations.get(name)
  if act.has_params:
    h = act.fn(h, p["cw"], p["cb"], impl="xla")
  elif act.gated:
    h = act.fn(x @ p["wg"] + p["bg"]) * h
  else:
    h = act.fn(h)
  return (h @ p["w2"] + p["b2"])[:, 0]


def fit(name: str, dim: int, target, width: int, steps: int) -> tuple[int, float]:
  """(parameters, best test RMSE over SEEDS) after full-batch Adam with a cosine schedule;
  the seeds train in parallel under one compiled, vmapped loop."""
  tx = optax.adam(optax.cosine_decay_schedule(1e-2, steps, alpha=0.01))

  def one_seed(key):
    x_train = jax.random.uniform(jax.random.fold_in(key, 1), (512, dim), minval=-1, maxval=1)
    x_test = jax.random.uniform(jax.random.fold_in(key, 2), (2048, dim), minval=-1, maxval=1)
    y_train, y_test = target(x_train), target(x_test)

    def step(carry, _):
      params, opt = carry
      g = jax.grad(lambda p: jnp.mean((forward(p, name, x_train) - y_train) ** 2))(params)
      updates, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, updates), opt), None

    params = init(key, name, dim, width)
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return jnp.sqrt(jnp.mean((forward(params, name, x_test) - y_test) ** 2))

  errors = jax.jit(jax.vmap(one_seed))(jnp.stack([jax.random.key(s) for s in SEEDS]))
  n_params = sum(int(np.prod(v.shape)) for v in init(jax.random.key(0), name, dim,
                                                      width).values())
  return n_params, float(jnp.min(errors))


def main(argv):
  del argv
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  results = {}
  for tname, (dim, target) in TARGETS.items():
    for name in ACTIVATIONS:
      for width in WIDTHS:
        n_params, error = fit(name, dim, target, width, _STEPS.value)
        results.setdefault(tname, {}).setdefault(name, []).append((n_params, error))
        print(f"{tname:18s} {name:9s} width {width:3d}: {n_params:5d} params, "
              f"RMSE {error:.2e}", flush=True)
  fig, axes = plt.subplots(1, len(TARGETS), figsize=(4.4 * len(TARGETS), 3.8), dpi=120)
  for ax, (tname, by_act) in zip(axes, results.items()):
    for name, points in by_act.items():
      n, err = zip(*points)
      ax.loglog(n, err, "o-", label=name, ms=3)
    ax.set_title(tname)
    ax.set_xlabel("parameters")
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("test RMSE (best of 3 seeds)")
  axes[-1].legend(fontsize=8)
  fig.suptitle("One-hidden-layer MLPs: approximation error against parameters")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "function_approximation.png"))
  with open(os.path.join(out, "function_approximation.json"), "w") as f:
    json.dump(results, f, indent=1)
  lines = ["| target | " + " | ".join(ACTIVATIONS) + " |",
           "|---|" + "---|" * len(ACTIVATIONS)]
  for tname, by_act in results.items():
    # error of the widest model of each activation (about the same parameter count)
    lines.append(f"| {tname} | " + " | ".join(f"{by_act[a][-1][1]:.1e} ({by_act[a][-1][0]})"
                                              for a in ACTIVATIONS) + " |")
  table = "\n".join(lines)
  with open(os.path.join(out, "function_approximation.md"), "w") as f:
    f.write("# Function approximation (test RMSE, parameters in brackets, widest MLPs)\n\n"
            f"`python -m experiments.function_approximation --out={out}`\n\n{table}\n\n"
            "![function approximation](function_approximation.png)\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
