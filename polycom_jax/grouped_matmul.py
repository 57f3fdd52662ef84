"""Grouped matmuls for the MoE experts: rows of x, grouped by expert in expert order, each
times its expert's weight matrix (config.model.moe_matmul).

  ragged_dot  jax.lax.ragged_dot, XLA on every platform
  megablox    the Pallas TPU kernels that ship with jax (jax.experimental.pallas.ops.tpu.
              megablox): gmm for the forward pass and the input gradient, tgmm for the weight
              gradient, each visiting only the rows of its groups. Compiled by Mosaic when
              lowered for a TPU, interpreted elsewhere (tests)
  auto        megablox on TPU, ragged_dot elsewhere

Rows after the last group (padding, empty buffer slots) belong to no expert: their outputs are
zero and they get no gradient, on both paths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from polycom_jax.config_errors import ConfigError

IMPLS = ("auto", "ragged_dot", "megablox")
_TILE = 128    # megablox's row / contraction / output tile (its default; not tuned here)


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The implementation for `impl` on `platform` (default: JAX's default backend)."""
  if impl not in IMPLS:
    raise ConfigError(f"config.model.moe_matmul must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "megablox" if (platform or jax.default_backend()) == "tpu" else "ragged_dot"
  return impl


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str) -> jax.Array:
  """x [M, K] (rows grouped by expert) @ w [G, K, N] per group -> [M, N] in x's dtype;
  group_sizes [G] int32 with sum <= M."""
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x, w, group_sizes)
  if impl != "megablox":
    raise ConfigError(f"moe_matmul {impl!r} is not resolved (one of {IMPLS[1:]})")
  m, k = x.shape
  # gmm leaves the rows after the last group unwritten (garbage; NaN when interpreted), in the
  # output and in the input gradient: both are set to zero by selects that fuse into their
  # consumers (a select on x itself would copy it for the kernel).
  used = jnp.sum(group_sizes)
  in_groups = (jnp.arange(m) < used)[:, None]
  x = _zero_gradient_after(x, used)
  pad = -m % _TILE                      # gmm needs whole row tiles; the padding is in no group
  xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
  tiling = (_TILE, min(_TILE, k), min(_TILE, w.shape[2]))
  run = lambda interpret: functools.partial(_gmm, tiling=tiling, interpret=interpret)
  out = jax.lax.platform_dependent(xp, w, group_sizes.astype(jnp.int32),
                                   tpu=run(False), default=run(True))
  return jnp.where(in_groups, out[:m], 0)


def _gmm(x, w, group_sizes, *, tiling, interpret):
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
  return megablox.gmm(x, w, group_sizes, x.dtype, tiling, None, None, False, interpret)


@jax.custom_vjp
def _zero_gradient_after(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x itself; in the backward pass, the gradient of its rows from `rows` on is zero."""
  return x


def _zero_gradient_fwd(x, rows):
  return x, rows


def _zero_gradient_bwd(rows, g):
  return jnp.where((jnp.arange(g.shape[0]) < rows)[:, None], g, 0), None


_zero_gradient_after.defvjp(_zero_gradient_fwd, _zero_gradient_bwd)
