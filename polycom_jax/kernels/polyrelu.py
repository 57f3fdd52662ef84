"""Fused PolyReLU with a custom VJP that saves only x.

With z = relu(x) and c_p = weight[r-p]: y = b + sum_p c_p z**p (Horner, float32, cast back),
  dL/dx = g 1[x>0] sum_p p c_p z**(p-1),   dL/dc_p = sum g z**p,   dL/db = sum g.
Elementwise, but the kernels use the same whole-row blocks as PolyNorm (rowwise.py): the backward
kernel writes dx and per-row [sum g, sum g z, ..., sum g z**r], reduced to dweight, dbias outside.
Sharded, no cross-shard reduction is needed except the psum of those sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from polycom_jax.kernels import rowwise
from polycom_jax.kernels.layout import Layout
from polycom_jax.kernels.rowwise import as_rows, pack, polyval


def _fwd_body(x, w, b):
  order = len(w)
  return (polyval(jnp.maximum(x, 0.0), [b[0]] + [w[order - p] for p in range(1, order + 1)]),)


def _bwd_body(x, g, w, *, width):
  """dx and the per-row [sum g, sum g z, ..., sum g z**r]."""
  order = len(w)
  z = jnp.maximum(x, 0.0)
  slope = polyval(z, [p * w[order - p] for p in range(1, order + 1)])
  dx = jnp.where(x > 0, g * slope, 0.0)
  sums, zp = [jnp.sum(g, axis=1, keepdims=True)], z
  for p in range(1, order + 1):
    zp = zp if p == 1 else zp * z
    sums.append(jnp.sum(g * zp, axis=1, keepdims=True))
  return dx, pack(sums, width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _poly_relu(x, w, b, impl, layout):
  return _poly_relu_fwd(x, w, b, impl, layout)[0]


def _poly_relu_fwd(x, w, b, impl, layout: Layout):
  def local(x, w, b):
    (y,) = rowwise.rowwise(_fwd_body, [as_rows(x)], coefs=[w, b], row_dtypes=[x.dtype],
                           n_stat_out=0, width=rowwise.stat_width(w.shape[0]), impl=impl)
    return y.reshape(x.shape)

  return layout.map(local, "xrr", "x")(x, w, b), (x, w, b)


def _poly_relu_bwd(impl, layout: Layout, res, g):
  x, w, b = res
  order, width = w.shape[0], rowwise.stat_width(w.shape[0])
  all_axes = layout.row_axes + layout.col_axes

  def local(x, g, w, b):
    dx, sums = rowwise.rowwise(functools.partial(_bwd_body, width=width), [as_rows(x), as_rows(g)],
                               coefs=[w], row_dtypes=[x.dtype], n_stat_out=1, width=width,
                               impl=impl)
    total = jnp.sum(sums, axis=0)                       # [W]: sum g, sum g z**p
    total = lax.psum(total, all_axes) if all_axes else total
    return dx.reshape(x.shape), total[1:order + 1][::-1].astype(w.dtype), total[:1].astype(b.dtype)

  return layout.map(local, "xxrr", "xrr")(x, g, w, b)


_poly_relu.defvjp(_poly_relu_fwd, _poly_relu_bwd)


def poly_relu(x: jax.Array, weight: jax.Array, bias: jax.Array, *, impl: str,
              layout: Layout = Layout()) -> jax.Array:
  """PolyReLU of x (any shape with a last axis, any float dtype; y in x's dtype) by impl."""
  return _poly_relu(x, weight, bias, impl, layout)
