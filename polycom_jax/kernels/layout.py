"""Where an activation input lives: on one device, or sharded over a mesh by a PartitionSpec.

The kernels' custom VJPs run their forward and backward through `Layout.map`: a plain call for one
device, `jax.shard_map` otherwise (XLA cannot partition a pallas_call; GSPMD would gather it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


@dataclasses.dataclass(frozen=True)
class Layout:
  """mesh None: one device. Otherwise x is sharded by spec (one entry per axis of x); the mesh
  axes of its last entry split the reduced dimension D, the others split rows."""
  mesh: Mesh | None = None
  spec: P = P()

  @property
  def col_axes(self) -> tuple[str, ...]:
    """Mesh axes sharding D: row statistics need a psum over these."""
    return _axes(self.spec[-1]) if self.mesh is not None and self.spec else ()

  @property
  def row_axes(self) -> tuple[str, ...]:
    """Mesh axes sharding the rows: parameter gradients need a psum over these."""
    if self.mesh is None:
      return ()
    return tuple(a for entry in self.spec[:-1] for a in _axes(entry))

  def psum_rows(self, value: jax.Array) -> jax.Array:
    return lax.psum(value, self.row_axes) if self.row_axes else value

  def map(self, fn: Callable, in_kinds: str, out_kinds: str) -> Callable:
    """fn on local shards. Kinds, one letter per argument/output: x (sharded like x),
    s (per-row statistics [..., W]: x's spec with the last axis unsharded), r (replicated)."""
    if self.mesh is None:
      return fn
    specs = {"x": self.spec, "s": P(*self.spec[:-1], None), "r": P()}
    in_specs = tuple(specs[k] for k in in_kinds)
    out_specs = tuple(specs[k] for k in out_kinds)
    # check_vma=False: pallas_call outputs carry no varying-axes type in jax 0.10-0.12 unless
    # each out_shape names one; the bodies psum explicitly wherever a value must be replicated.
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                         out_specs=out_specs if len(out_specs) > 1 else out_specs[0],
                         check_vma=False)


def make_layout(mesh: Mesh, x_spec, ndim: int) -> Layout:
  """Layout for an x of ndim axes sharded by x_spec (missing trailing entries: unsharded)."""
  entries = tuple(x_spec)
  if len(entries) > ndim:
    raise ValueError(f"x_spec {x_spec} has more entries than x has axes ({ndim})")
  return Layout(mesh, P(*entries, *([None] * (ndim - len(entries)))))
