"""Fused PolyNorm / PolyReLU: custom-VJP jnp paths ("xla") and Pallas kernels ("pallas").

Both impls save only x (and, for PolyNorm, per-row float32 statistics) for the backward pass and
compute dx, dweight, dbias from the derived formulas (polynorm.py). The Pallas kernels lower to
Mosaic on TPU, Triton on GPU and run in interpret mode on CPU; the backend is picked at lowering
time (rowwise.py). The *_sharded variants run under jax.shard_map for x sharded over a mesh,
including D (the last axis) split over tensor-parallel axes.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from polycom_jax.kernels import polynorm, polyrelu
from polycom_jax.kernels.layout import make_layout

IMPLS = ("xla", "pallas")


def _check(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")


def poly_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = 1e-6, *,
              impl: str) -> jax.Array:
  """PolyNorm over the last axis of x (any leading shape); weight [r], bias [1]."""
  _check(impl)
  return polynorm.poly_norm(x, weight, bias, eps, impl=impl)


def poly_relu(x: jax.Array, weight: jax.Array, bias: jax.Array, *, impl: str) -> jax.Array:
  """PolyReLU, elementwise; weight [r], bias [1]."""
  _check(impl)
  return polyrelu.poly_relu(x, weight, bias, impl=impl)


def poly_norm_sharded(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = 1e-6, *,
                      impl: str, mesh: Mesh, x_spec) -> jax.Array:
  """poly_norm of a global x sharded over mesh by x_spec (a PartitionSpec, one entry per axis).

  The mesh axes of x_spec's last entry split D: row statistics are psum'd over them. weight and
  bias are replicated; their gradients are summed over every axis that shards x.
  """
  _check(impl)
  return polynorm.poly_norm(x, weight, bias, eps, impl=impl,
                            layout=make_layout(mesh, x_spec, x.ndim))


def poly_relu_sharded(x: jax.Array, weight: jax.Array, bias: jax.Array, *, impl: str, mesh: Mesh,
                      x_spec) -> jax.Array:
  """poly_relu of a global x sharded over mesh by x_spec; gradients as in poly_norm_sharded."""
  _check(impl)
  return polyrelu.poly_relu(x, weight, bias, impl=impl, layout=make_layout(mesh, x_spec, x.ndim))
