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


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float,
          dtype: Any) -> nnx.Param:
  """A normal(0, std) parameter tagged with logical axis names (sharded later, not eagerly)."""
  value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, statistics in float32."""

  def __init__(self, dim: int, eps: float, dtype: Any, param_dtype: Any, axis_name: str = "embed"):
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half layout) of x [B, T, H, Dh] at positions [B, T]."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)        # [Dh/2]
  angle = positions[..., None].astype(jnp.float32) * freq              # [B, T, Dh/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
