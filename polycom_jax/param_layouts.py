"""The model's two parameter layouts, and reading the PolyCom coefficients from either.

A list of per-layer subtrees (scan_layers=False) or one subtree of arrays with a leading
[num_layers] axis (scan_layers=True). stack_layers / unstack_layers convert pure dicts
(nnx.to_pure_dict); activation_coefficients reads a params State in either layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def stack_layers(params: dict) -> dict:
  """params with layers {0: tree, 1: tree, ...} turned into one tree of stacked arrays."""
  layers = params["layers"]
  per_layer = [layers[i] for i in sorted(layers, key=int)]
  stack = lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs)
  return {**params, "layers": jax.tree.map(stack, *per_layer)}


def unstack_layers(params: dict) -> dict:
  """The inverse of stack_layers: {0: tree, 1: tree, ...} from arrays [num_layers, ...]."""
  layers = params["layers"]
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": {i: jax.tree.map(lambda a: a[i], layers) for i in range(n)}}


def activation_coefficients(params) -> jax.Array | None:
  """[layers, r + 1]: each layer's shared PolyCom coefficients (weight..., bias) from a params
  State in either layout, or None for other activations; logged to follow how the mix of powers
  evolves during training."""
  layers = params["layers"]
  if isinstance(layers, nnx.State) and "mlp" in layers:      # scan_layers: arrays [layers, ...]
    act = layers["mlp"].get("act")
    if act is None or "weight" not in act:
      return None
    return jnp.concatenate([act["weight"][...], act["bias"][...]], axis=-1)
  rows = []
  for i in sorted(layers, key=int):
    act = layers[i]["mlp"].get("act")
    if act is None or "weight" not in act:
      return None
    rows.append(jnp.concatenate([act["weight"][...], act["bias"][...]]))
  return jnp.stack(rows)
