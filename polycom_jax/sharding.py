"""Device mesh from config, logical-axis rules, and shardings for parameters and batches.

The model names its parameter axes logically (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `expert`); RULES map each name to mesh axes, so changing the parallelism is a config
change only. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (Megatron-style tensor parallel), `expert` (MoE experts).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from polycom_jax.config_errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# Batch rows are split over every axis that holds a different slice of data.
BATCH_AXES = ("data", "fsdp", "expert")
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
)


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves config.mesh sizes (-1 = the devices left over) against the device count."""
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis} must be a positive size or -1, got {size}")
  auto = [a for a, s in sizes.items() if s == -1]
  if len(auto) > 1:
    raise ConfigError(f"only one of config.mesh.{{{','.join(MESH_AXES)}}} may be -1, got {auto}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if auto:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh: the fixed axes {_describe(sizes)} use {fixed} devices, which does not "
          f"divide the {num_devices} devices found")
    sizes[auto[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config.mesh {_describe(sizes)} needs {math.prod(sizes.values())} "
                      f"devices, but {num_devices} were found ({jax.default_backend()})")
  return sizes


def _describe(sizes: dict[str, int]) -> str:
  return "(" + ", ".join(f"{a}={s}" for a, s in sizes.items()) + ")"


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with the config's axis sizes, in GSPMD (Auto) mode.

  Devices are laid out by jax.make_mesh, which keeps the innermost (last) axes, here `tensor`
  and `expert`, on the fastest links (within a host / ICI ring).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except (ValueError, NotImplementedError):
    # Device kinds make_mesh cannot lay out (e.g. AOT topologies): plain row-major order.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(mesh_config) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules: config.mesh.rules (pairs) when given, else DEFAULT_RULES."""
  rules = mesh_config.get("rules", None)
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_to_mesh_spec(names: Sequence[str | None] | None, rules) -> P:
  """PartitionSpec for logical axis names; unnamed or unmapped axes are replicated."""
  if names is None:
    return P()
  table = dict(rules)
  return P(*(table.get(n) if n is not None else None for n in names))


def tree_shardings(tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (abstract) nnx Variables / arrays: by the Variables' logical
  names, replicated for everything else (step counters, optimizer scalars)."""
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding")
      spec = logical_to_mesh_spec(names, rules)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays [batch, seq]: rows over the data-holding axes, sequence replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
