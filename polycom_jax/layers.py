"""Building blocks shared by the dense model and the MoE layer.

Parameters are created by `param` with logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, `expert`) that the sharding rules map onto a mesh; activations are
constrained by the `activation_*` names below. Nothing here knows about a config object.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Logical names of activation axes (mapped to mesh axes by the sharding rules under a mesh).
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")      # [B, T, D]
HIDDEN = ("activation_batch", "activation_length", "activation_mlp")          # [B, T, F]
LOGITS = ("activation_batch", "activation_length", "activation_vocab")        # [B, T, V]


# What a parameter is, recorded where it is created (metadata `param_kind`): the weight decay
# rules (optimizer.decay_mask) decide by it, so the stacked [layers, ...] arrays of scan_layers
# and the per-expert [experts, ...] ones are treated like the arrays they stack.
PARAM_KINDS = ("matrix", "embedding", "norm", "activation")


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float,
          dtype: Any, *, kind: str = "matrix", truncate: float = 0.0) -> nnx.Param:
  """A normal(0, std) parameter tagged with logical axis names (sharded later, not eagerly) and
  its kind; truncate > 0: the normal is cut at +-truncate std (OLMo's init)."""
  key = rngs.params()
  if truncate > 0:
    value = std * jax.random.truncated_normal(key, -truncate, truncate, shape, dtype)
  else:
    value = std * jax.random.normal(key, shape, dtype)
  return nnx.Param(value, out_sharding=names, eager_sharding=False, param_kind=kind)


def constant_param(value: jax.Array, names: tuple[str | None, ...], kind: str) -> nnx.Param:
  """A parameter with a fixed initial value (norm scales, activation coefficients)."""
  return nnx.Param(value, out_sharding=names, eager_sharding=False, param_kind=kind)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the trailing axes `shape` (one axis, or several: OLMoE's QK-norm
  over a whole projection [heads, head_dim]), statistics in float32."""

  def __init__(self, shape: int | tuple[int, ...], eps: float, dtype: Any, param_dtype: Any,
               axis_names: str | tuple[str, ...] = "embed"):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    self.eps, self.dtype = eps, dtype
    self.axes = tuple(range(-len(shape), 0))
    self.scale = constant_param(jnp.ones(shape, param_dtype), names, "norm")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=self.axes, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half layout) of x [B, T, H, Dh] at positions [B, T]."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)        # [Dh/2]
  angle = positions[..., None].astype(jnp.float32) * freq              # [B, T, Dh/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def over_sequence_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
  """fn(x) for a position-wise fn of x [B, T, ...], computed `chunk` positions at a time, each
  chunk under jax.checkpoint: the backward pass then holds one chunk's intermediates (for the
  MLP, [B, chunk, d_ff] instead of [B, T, d_ff]) and recomputes them from the chunk's input.
  Unchunked when chunk is 0 or does not divide T (decoding, short prompts)."""
  b, t = x.shape[:2]
  if not chunk or t <= chunk or t % chunk:
    return fn(x)
  xs = x.reshape(b, t // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)    # [T/chunk, B, chunk, ...]
  ys = jax.lax.map(jax.checkpoint(fn, prevent_cse=False), xs)
  return ys.swapaxes(0, 1).reshape(b, t, *ys.shape[3:])
