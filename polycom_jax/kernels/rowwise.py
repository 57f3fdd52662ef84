"""Runs a row-wise body over [rows, D] arrays: whole, in jnp (impl="xla"), or per block of rows
in one Pallas kernel (impl="pallas"): Mosaic on TPU, Triton on GPU, interpret mode elsewhere.

A body is plain jnp code on float32 arrays. It receives, in order: "row" arrays [bm, bd]
(x, dy: the whole row, padded columns read as 0, bd >= D), "stat" arrays [bm, W] of per-row float32
statistics (W = stat_width(order), a power of two, so Triton can load them), and coefficient
vectors as lists of scalars (weight, bias). It returns its row outputs (cast to the requested
dtypes) followed by its stat outputs. The same body is the xla path (bm = rows, bd = D), so the
two impls share one formula.

The Pallas backend is picked when the computation is LOWERED (`lax.platform_dependent`), not by
the default backend at trace time: a function traced on CPU lowers for TPU or CUDA unchanged.
The GPU backend is chosen by the type of compiler_params (Triton; jax 0.10's default GPU lowering,
Mosaic GPU, rejects these kernels).

Block sizes (a whole row is always in one block, so row statistics need no cross-block pass):
- TPU: bd = D (a block dim equal to the array dim satisfies Mosaic's (8, 128) tiling for any D);
  bm a multiple of 8 (of 16 for 16-bit dtypes where possible) so one float32 block
  [bm, round_up(D, 128)] is at most TPU_BLOCK_BYTES: with double-buffered inputs/outputs and the
  kernel's float32 temporaries the backward then fits the 16 MiB VMEM of v4 (compiled for v4, v5e,
  v5p, v6e, 7x with libtpu; 2 MiB blocks did not fit v4/v5p). D > 32768 (bm < 8) falls back to
  the xla path. Rows past the end of the last block are garbage and never written.
- GPU (Triton): tensor sizes must be powers of two: bd = next_power_of_2(D), bm = rows per program
  so a block holds ~GPU_BLOCK_ELEMS elements (one row from D = 4096 up), num_warps so each thread
  holds ~16 elements of a block; loads and stores are masked (padded columns read 0). D > 65536
  falls back to the xla path.
- Interpret (CPU): the Triton layout and masking, with large blocks so the grid has few steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

TPU_BLOCK_BYTES = 1 << 20
GPU_BLOCK_ELEMS = 4096
GPU_MAX_COLS = 1 << 16
INTERPRET_BLOCK_ELEMS = 1 << 20


def as_rows(a: jax.Array) -> jax.Array:
  """[..., D] -> [rows, D]."""
  return a.reshape(-1, a.shape[-1])


def stat_width(order: int) -> int:
  """Columns of a per-row statistics array: order + 1 values, padded to a power of two."""
  return pl.next_power_of_2(order + 1)


def pack(columns: Sequence[jax.Array], width: int) -> jax.Array:
  """[rows, 1] columns -> [rows, width] (unused columns 0), by select: lowers on TPU and Triton."""
  idx = lax.broadcasted_iota(jnp.int32, (columns[0].shape[0], width), 1)
  out = jnp.zeros((columns[0].shape[0], width), jnp.float32)
  for j, col in enumerate(columns):
    out = jnp.where(idx == j, col, out)
  return out


def column(stats: jax.Array, j: int) -> jax.Array:
  """Column j of a [rows, W] statistics array as [rows, 1] (a masked row sum, no lane slicing)."""
  idx = lax.broadcasted_iota(jnp.int32, stats.shape, 1)
  return jnp.sum(jnp.where(idx == j, stats, 0.0), axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """One kernel's blocks, [block_rows, block_cols] per row array, for backend tpu|triton|interpret;
  interpret is pallas_call's argument (True on CPU; pltpu.InterpretParams() simulates a TPU)."""
  backend: str
  block_rows: int
  block_cols: int
  interpret: Any = False

  @property
  def masked(self) -> bool:
    """Triton has no implicit bounds handling: loads and stores carry explicit masks."""
    return self.backend != "tpu"


def choose_tiling(backend: str, rows: int, cols: int, itemsize: int) -> Tiling | None:
  """Block sizes for [rows, cols] arrays of the given (smallest) itemsize; None: too wide."""
  if backend == "tpu":
    bm = TPU_BLOCK_BYTES // (4 * (-(-cols // 128) * 128))
    if bm < 8:
      return None
    packed = 32 // itemsize                       # rows per native tile: 8 f32, 16 bf16
    bm = bm // packed * packed if bm >= packed else bm // 8 * 8
    return Tiling(backend, rows if rows <= bm else bm, cols)
  bd = pl.next_power_of_2(cols)
  if backend == "triton" and bd > GPU_MAX_COLS:
    return None
  elems = GPU_BLOCK_ELEMS if backend == "triton" else INTERPRET_BLOCK_ELEMS
  bm = min(max(1, elems // bd), pl.next_power_of_2(rows))
  return Tiling(backend, bm, bd, interpret=backend == "interpret")


def _compiler_params(tiling: Tiling):
  """Mosaic params on TPU (row blocks are independent: "parallel"), Triton params on GPU."""
  if tiling.backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  if tiling.backend == "triton":
    elems = tiling.block_rows * tiling.block_cols
    return pltriton.CompilerParams(num_warps=min(32, max(4, elems // 512)))
  return None


def _load(ref, mask, masked: bool) -> jax.Array:
  if masked:
    return pltriton.load(ref, mask=mask, other=0).astype(jnp.float32)
  return ref[...].astype(jnp.float32)


def _store(ref, value, mask, masked: bool) -> None:
  value = value.astype(ref.dtype)
  if masked:
    pltriton.store(ref, value, mask=mask)
  else:
    ref[...] = value


def _kernel(*refs, body, n_rows, n_stats, n_coefs, n_row_out, n, d, tiling: Tiling):
  """Loads one block of every input, applies body, stores every output (masked on Triton)."""
  n_in = n_rows + n_stats + n_coefs
  row_refs, stat_refs = refs[:n_rows], refs[n_rows:n_rows + n_stats]
  coef_refs, out_refs = refs[n_rows + n_stats:n_in], refs[n_in:]
  bm, bd = tiling.block_rows, tiling.block_cols
  first = pl.program_id(0) * bm
  row_mask = (first + lax.broadcasted_iota(jnp.int32, (bm, bd), 0) < n) & (
      lax.broadcasted_iota(jnp.int32, (bm, bd), 1) < d)

  def row_ok(shape):
    return first + lax.broadcasted_iota(jnp.int32, shape, 0) < n

  rows = [_load(r, row_mask, tiling.masked) for r in row_refs]
  stats = [_load(r, row_ok(r.shape), tiling.masked) for r in stat_refs]
  coefs = [[r[j].astype(jnp.float32) for j in range(r.shape[0])] for r in coef_refs]
  for k, (ref, value) in enumerate(zip(out_refs, body(*rows, *stats, *coefs))):
    _store(ref, value, row_mask if k < n_row_out else row_ok(ref.shape), tiling.masked)


def _pallas(body, rows, stats, coefs, row_dtypes, n_stat_out, width, tiling: Tiling):
  """body as one pallas_call over a 1-D grid of row blocks."""
  n, d = rows[0].shape
  bm, bd = tiling.block_rows, tiling.block_cols
  row_spec = pl.BlockSpec((bm, bd), lambda i: (i, 0))
  stat_spec = pl.BlockSpec((bm, width), lambda i: (i, 0))
  if tiling.backend == "tpu":
    coef_specs = [pl.BlockSpec(memory_space=pltpu.SMEM) for _ in coefs]
  else:
    coef_specs = [pl.BlockSpec(c.shape, lambda i: (0,)) for c in coefs]
  out_shape = ([jax.ShapeDtypeStruct((n, d), dt) for dt in row_dtypes]
               + [jax.ShapeDtypeStruct((n, width), jnp.float32)] * n_stat_out)
  kernel = functools.partial(_kernel, body=body, n_rows=len(rows), n_stats=len(stats),
                             n_coefs=len(coefs), n_row_out=len(row_dtypes), n=n, d=d,
                             tiling=tiling)
  return tuple(pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(pl.cdiv(n, bm),),
      in_specs=[row_spec] * len(rows) + [stat_spec] * len(stats) + coef_specs,
      out_specs=[row_spec] * len(row_dtypes) + [stat_spec] * n_stat_out,
      compiler_params=_compiler_params(tiling),
      interpret=tiling.interpret,
      name=getattr(body, "func", body).__name__,
  )(*rows, *stats, *coefs))


def _xla(body, rows, stats, coefs, row_dtypes):
  """body on the whole arrays: the fused jnp path, and the fallback for rows too wide to block."""
  coefs = [[c[j].astype(jnp.float32) for j in range(c.shape[0])] for c in coefs]
  outs = body(*(r.astype(jnp.float32) for r in rows), *stats, *coefs)
  return tuple(o.astype(dt) for o, dt in zip(outs, row_dtypes)) + tuple(outs[len(row_dtypes):])


def rowwise(body: Callable, rows: Sequence[jax.Array], stats: Sequence[jax.Array] = (),
            coefs: Sequence[jax.Array] = (), *, row_dtypes: Sequence, n_stat_out: int,
            width: int, impl: str) -> tuple[jax.Array, ...]:
  """Applies body to [rows, D] row arrays, [rows, width] stats and coefficient vectors.

  Returns the row outputs ([rows, D], in row_dtypes) then n_stat_out [rows, width] float32 arrays.
  """
  rows, stats, coefs = tuple(rows), tuple(stats), tuple(coefs)
  if impl == "xla":
    return _xla(body, rows, stats, coefs, row_dtypes)
  n, d = rows[0].shape
  itemsize = min(jnp.dtype(t).itemsize for t in [a.dtype for a in rows] + list(row_dtypes))

  def branch(backend):
    tiling = choose_tiling(backend, n, d, itemsize)

    def run(*args):
      k = len(rows) + len(stats)
      r, s, c = args[:len(rows)], args[len(rows):k], args[k:]
      if tiling is None:  # a row too wide for one block on this backend: the jnp path
        return _xla(body, r, s, c, row_dtypes)
      return _pallas(body, r, s, c, row_dtypes, n_stat_out, width, tiling)
    return run

  return lax.platform_dependent(*rows, *stats, *coefs, tpu=branch("tpu"), cuda=branch("triton"),
                                rocm=branch("triton"), default=branch("interpret"))


def polyval(z: jax.Array, coefs: Sequence) -> jax.Array:
  """sum_j coefs[j] * z**j by Horner's rule (coefs: scalars or per-row [rows, 1] arrays)."""
  acc = coefs[-1]
  for c in reversed(coefs[:-1]):
    acc = acc * z + c
  return acc
