"""Fused PolyNorm with a custom VJP that saves only x and per-row float32 statistics.

Math, per row of length D, p = 1..r, c_p = weight[r-p] (shared/PAPER_NOTES.md, "Gradients"):
  u_p = x**p,  r_p = (mean(u_p**2) + eps)**-0.5,  n_p = r_p u_p,  y = sum_p c_p n_p + b
  dL/dx   = sum_p c_p p x**(p-1) r_p (g - n_p mean(g n_p))
  dL/dc_p = sum_rows r_p sum_i g_i x_i**p,   dL/db = sum g

Scaled form (what runs, as in activations.poly_norm_reference): s = max|x| per row (1 for an
all-zero row), z = x / s, so z**(2r) is finite for rows of any magnitude. With
e_p = eps / s**(2p) (exponent clamped as in the reference) and
  t_p = (mean(z**(2p)) + e_p)**-0.5 = s**p r_p,   n_p = t_p z**p   (the same n_p),
and x**(p-1) r_p = z**(p-1) t_p / s, x**p r_p = z**p t_p, the formulas become
  y       = b + sum_p (c_p t_p) z**p                             (Horner in z)
  S_p     = sum_i g_i z_i**p,   a_p = mean(g n_p) = t_p S_p / D
  dL/dx   = (1/s) sum_p c_p p t_p z**(p-1) (g - a_p t_p z**p)
  dL/dc_p = sum_rows t_p S_p,   dL/db = sum_rows sum_i g_i.
y does not depend on s, so s carries no gradient. Forward: one read of x (row max, then the sums
of z**(2p) from the block in registers/VMEM), one write of y, and the per-row stats [s, t_1..t_r]
saved. Backward: one read of x and g (S_p and sum g, then dx), one write of dx, plus per-row
[sum g, S_1..S_r] reduced to dweight, dbias outside the kernel (O(rows) work).

Tensor parallelism (D sharded over mesh axes): the forward is split in a "stats" pass (each shard's
row max s_loc and sums of (x/s_loc)**(2p)), a combine (s = pmax s_loc; the sums rescaled by
(s_loc/s)**(2p) and psum'd) and an "apply" pass; the backward psums [sum g, S_p] between its
stats and dx passes. Each pass is one kernel (impl="pallas") or jnp (impl="xla"); on one device
the passes are fused into one kernel each way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from polycom_jax.kernels import rowwise
from polycom_jax.kernels.layout import Layout
from polycom_jax.kernels.rowwise import as_rows, column, pack, polyval

# exp() of this stays finite in float32: bounds eps / s**(2p) for rows of tiny magnitude.
MAX_LOG_EPS = 80.0


# ---- the math on float32 blocks [rows, D] (shared by the jnp path and the kernels) ---------------

def _safe(s):
  """The row scale used: max|x|, or 1 where that is 0 or not finite (as the reference)."""
  return jnp.where((s > 0) & (s < jnp.inf), s, 1.0)


def _scale(x):
  """Row max |x| ([rows, 1]) and the scale used."""
  s = jnp.max(jnp.abs(x), axis=1, keepdims=True)
  return s, _safe(s)


def _power_sums(z, order):
  """[sum(z**2), sum(z**4), ..., sum(z**(2 order))] over each row, each [rows, 1]."""
  sums, zp = [], z
  for p in range(1, order + 1):
    zp = zp if p == 1 else zp * z
    sums.append(jnp.sum(zp * zp, axis=1, keepdims=True))
  return sums


def _inv_rms(s, sums, d, eps):
  """t_p = (sum_p / d + eps / s**(2p))**-0.5 for the scaled row z = x / s."""
  log_s = jnp.log(s)
  return [lax.rsqrt(t / d + jnp.exp(jnp.minimum(math.log(eps) - 2 * p * log_s, MAX_LOG_EPS)))
          for p, t in enumerate(sums, 1)]


def _unpack(stats, order):
  """[rows, W] stats -> s, [t_1..t_r] (each [rows, 1])."""
  return column(stats, 0), [column(stats, p) for p in range(1, order + 1)]


def _fwd_body(x, w, b, *, d, eps, width):
  """Fused forward: y and the stats [s, t_1..t_r] of each row."""
  order = len(w)
  _, s = _scale(x)
  z = x * (1.0 / s)
  t = _inv_rms(s, _power_sums(z, order), d, eps)
  y = polyval(z, [b[0]] + [w[order - p] * t[p - 1] for p in range(1, order + 1)])
  return y, pack([s] + t, width)


def _stats_body(x, *, order, width):
  """Stats pass on a shard of D: [max|x|, sum((x/s_loc)**2p) for p = 1..r] per row."""
  s_raw, s = _scale(x)
  return (pack([s_raw] + _power_sums(x * (1.0 / s), order), width),)


def _apply_body(x, stats, w, b):
  """Apply pass: y from x and the (combined) stats."""
  order = len(w)
  s, t = _unpack(stats, order)
  z = x * (1.0 / s)
  return (polyval(z, [b[0]] + [w[order - p] * t[p - 1] for p in range(1, order + 1)]),)


def _grad_sums_body(x, g, stats, *, order, width):
  """Backward stats pass: [sum g, S_1..S_r] per row, S_p = sum g z**p."""
  z = x * (1.0 / column(stats, 0))
  sums, zp = [jnp.sum(g, axis=1, keepdims=True)], z
  for p in range(1, order + 1):
    zp = zp if p == 1 else zp * z
    sums.append(jnp.sum(g * zp, axis=1, keepdims=True))
  return (pack(sums, width),)


def _grad_x_body(x, g, stats, sums, w, *, d):
  """Backward dx pass: (1/s) sum_p c_p p t_p z**(p-1) (g - a_p t_p z**p), a_p = t_p S_p / d."""
  order = len(w)
  s, t = _unpack(stats, order)
  z = x * (1.0 / s)
  dx, zp_1 = 0.0, None                                  # zp_1 = z**(p-1); None for z**0
  for p in range(1, order + 1):
    zp = z if zp_1 is None else zp_1 * z
    a_t = t[p - 1] * t[p - 1] * column(sums, p) / d     # a_p t_p
    term = (w[order - p] * p) * t[p - 1] * (g - a_t * zp)
    dx = dx + (term if zp_1 is None else term * zp_1)
    zp_1 = zp
  return (dx * (1.0 / s),)


def _bwd_body(x, g, stats, w, *, d, width):
  """Fused backward: dx and the per-row [sum g, S_1..S_r]."""
  (sums,) = _grad_sums_body(x, g, stats, order=len(w), width=width)
  (dx,) = _grad_x_body(x, g, stats, sums, w, d=d)
  return dx, sums


# ---- passes over a local [rows, D] shard ---------------------------------------------------------

def _combine(part, axes, order, d, eps, width):
  """Partial stats of D-shards -> [s, t_1..t_r] of the whole rows (pmax, then psum)."""
  s_loc = column(part, 0)
  s = _safe(lax.pmax(s_loc, axes))
  ratio = s_loc / s                                     # in [0, 1]: 0 for an all-zero shard
  rescaled = pack([column(part, p) * ratio ** (2 * p) for p in range(1, order + 1)], width)
  sums = lax.psum(rescaled, axes)
  return pack([s] + _inv_rms(s, [column(sums, j) for j in range(order)], d, eps), width)


def _forward(x, w, b, eps, impl, d, col_axes):
  """y [rows, D_local] and stats [rows, W] of x [rows, D_local]; d is the whole row's length."""
  width = rowwise.stat_width(len(w))
  run = functools.partial(rowwise.rowwise, width=width, impl=impl)
  if not col_axes:
    return run(functools.partial(_fwd_body, d=d, eps=eps, width=width), [x], coefs=[w, b],
               row_dtypes=[x.dtype], n_stat_out=1)
  (part,) = run(functools.partial(_stats_body, order=len(w), width=width), [x],
                row_dtypes=[], n_stat_out=1)
  stats = _combine(part, col_axes, len(w), d, eps, width)
  (y,) = run(_apply_body, [x], [stats], [w, b], row_dtypes=[x.dtype], n_stat_out=0)
  return y, stats


def _backward(x, g, stats, w, impl, d, col_axes):
  """dx [rows, D_local] and the per-row [sum g, S_1..S_r] of whole rows."""
  width = rowwise.stat_width(len(w))
  run = functools.partial(rowwise.rowwise, width=width, impl=impl)
  if not col_axes:
    return run(functools.partial(_bwd_body, d=d, width=width), [x, g], [stats], [w],
               row_dtypes=[x.dtype], n_stat_out=1)
  (sums,) = run(functools.partial(_grad_sums_body, order=len(w), width=width), [x, g], [stats],
                row_dtypes=[], n_stat_out=1)
  sums = lax.psum(sums, col_axes)
  (dx,) = run(functools.partial(_grad_x_body, d=d), [x, g], [stats, sums], [w],
              row_dtypes=[x.dtype], n_stat_out=0)
  return dx, sums


def _param_grads(sums, stats, w, b, layout):
  """dweight [r], dbias [1] from per-row sums and stats [rows, W]: sum_rows t_p S_p, sum g."""
  keep = lax.broadcasted_iota(jnp.int32, sums.shape, 1) == 0
  total = layout.psum_rows(jnp.sum(sums * jnp.where(keep, 1.0, stats), axis=0))   # [W]
  order = w.shape[0]
  return total[1:order + 1][::-1].astype(w.dtype), total[:1].astype(b.dtype)


# ---- custom VJP ----------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _poly_norm(x, w, b, eps, impl, layout):
  return _poly_norm_fwd(x, w, b, eps, impl, layout)[0]


def _poly_norm_fwd(x, w, b, eps, impl, layout: Layout):
  d = x.shape[-1]

  def local(x, w, b):
    y, stats = _forward(as_rows(x), w, b, eps, impl, d, layout.col_axes)
    return y.reshape(x.shape), stats.reshape(*x.shape[:-1], stats.shape[-1])

  y, stats = layout.map(local, "xrr", "xs")(x, w, b)
  return y, (x, stats, w, b)


def _poly_norm_bwd(eps, impl, layout: Layout, res, g):
  del eps
  x, stats, w, b = res
  d = x.shape[-1]

  def local(x, g, stats, w, b):
    dx, sums = _backward(as_rows(x), as_rows(g), as_rows(stats), w, impl, d, layout.col_axes)
    return (dx.reshape(x.shape), *_param_grads(sums, as_rows(stats), w, b, layout))

  return layout.map(local, "xxsrr", "xrr")(x, g, stats, w, b)


_poly_norm.defvjp(_poly_norm_fwd, _poly_norm_bwd)


def poly_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float, *, impl: str,
              layout: Layout = Layout()) -> jax.Array:
  """PolyNorm over the last axis of x (any leading shape, any float dtype; y in x's dtype).

  impl "xla": the fused jnp formula; "pallas": one kernel forward, one backward (interpret mode
  on CPU; rows too wide for one block fall back to the jnp formula, see rowwise.py).
  """
  return _poly_norm(x, weight, bias, eps, impl, layout)
