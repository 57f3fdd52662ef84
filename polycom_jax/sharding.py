"""Device mesh from config, logical-axis rules, and shardings for parameters and batches.

The model names its parameter axes logically (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `expert`) and constrains its activations by `activation_*` names; rules (config.mesh.rules
over DEFAULT_RULES) map each name to mesh axes, so changing the parallelism is a config change
only. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (Megatron-style tensor parallel), `expert` (MoE experts).
`config.mesh.dcn_data` > 1 splits `data` over slices (TPU multi-slice) or processes (GPU nodes)
joined by the slower data-centre network; every other axis stays inside one slice / host.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Sequence

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
    ("layers", None),   # scan_layers' stacked-layer axis: not split (each layer's own axes are)
    # Activations: batch rows split like the batch, the residual stream whole on each device
    # (FSDP gathers weights, not activations), MLP hidden units and logits split like the weights
    # that produce them (so PolyNorm's row statistics need a reduction over `tensor`).
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_heads", "tensor"),      # q / k / v heads, where attention runs per shard
    ("activation_kv_heads", "tensor"),
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

  The innermost (last) axes, `tensor` and `expert`, get the fastest links: jax.make_mesh
  follows the TPU torus and orders GPUs by id, i.e. host by host. With dcn_data > 1, each of
  the dcn_data granules (TPU slices, else equal blocks of processes: hosts) holds a contiguous
  part of `data` and the whole of every other axis, as create_hybrid_device_mesh lays out a
  DCN split of `data` alone (here also for several processes per host).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  dcn_data = int(mesh_config.get("dcn_data", 1))
  if dcn_data < 1 or sizes["data"] % dcn_data:
    raise ConfigError(f"config.mesh.dcn_data ({dcn_data}) must be >= 1 and divide the data axis "
                      f"size {sizes['data']} (mesh {_describe(sizes)})")
  ici = tuple(sizes[a] // (dcn_data if a == "data" else 1) for a in MESH_AXES)
  blocks = [_device_array(ici, g) for g in _dcn_granules(devices, dcn_data)]
  return Mesh(np.concatenate(blocks, axis=0), MESH_AXES,            # granules along `data`
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _device_array(shape: tuple[int, ...], devices: list[jax.Device]) -> np.ndarray:
  """One granule's devices in jax.make_mesh's topology-aware order."""
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices).devices
  except (ValueError, NotImplementedError):
    # Device kinds make_mesh cannot lay out (e.g. AOT topologies): plain row-major order.
    return np.asarray(devices).reshape(shape)


def _dcn_granules(devices: list[jax.Device], n: int) -> list[list[jax.Device]]:
  """devices in n equal granules: TPU slices when they span several, else consecutive blocks of
  processes (hosts, as SLURM and TPU pods number processes host by host)."""
  if n == 1:
    return [devices]
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  procs = sorted({d.process_index for d in devices})
  groups = collections.defaultdict(list)
  for d in devices:
    k = d.slice_index if len(slices) > 1 else procs.index(d.process_index) * n // len(procs)
    groups[k].append(d)
  counts = [len(groups[k]) for k in sorted(groups)]
  if len(counts) != n or len(set(counts)) != 1 or (len(slices) == 1 and len(procs) % n):
    raise ConfigError(
        f"config.mesh.dcn_data={n} splits `data` over {n} TPU slices or {n} equal blocks of "
        f"processes (hosts), but the {len(devices)} devices are in {len(slices)} slice(s) and "
        f"{len(procs)} process(es)")
  return [groups[k] for k in sorted(groups)]


def rules_from_config(mesh_config) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES with config.mesh.rules's (name, mesh axes) pairs replacing theirs by name."""
  table = dict(DEFAULT_RULES)
  for entry in mesh_config.get("rules", None) or ():
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ConfigError(f"config.mesh.rules: each entry must be a (logical name, mesh axes) "
                        f"pair, got {entry!r}")
    name, axes = entry
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    unknown = [a for a in (axes if isinstance(axes, tuple) else (axes,))
               if a is not None and a not in MESH_AXES]
    if unknown:
      raise ConfigError(f"config.mesh.rules: {name!r} maps to unknown mesh axes {unknown}; "
                        f"the mesh axes are {MESH_AXES} (or None: replicated)")
    table[name] = axes
  return tuple(table.items())


def logical_to_mesh_spec(names: Sequence[str | None] | None, rules) -> P:
  """PartitionSpec for logical axis names; unnamed or unmapped axes are replicated."""
  if names is None:
    return P()
  table = dict(rules)
  return P(*(table.get(n) if n is not None else None for n in names))


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _checked_spec(path: str, shape: Sequence[int], names, rules, mesh: Mesh) -> P:
  """The spec of a named array, or a ConfigError if it reuses a mesh axis or splits a dimension
  unevenly (jit would refuse it later with a less helpful message)."""
  spec = logical_to_mesh_spec(names, rules)
  used = [a for entry in spec for a in axes_of(entry)]
  if len(used) != len(set(used)):
    raise ConfigError(f"config.mesh.rules put a mesh axis on two dimensions of {path} "
                      f"(logical axes {tuple(names)} -> {spec})")
  for dim, name, entry in zip(shape, names, spec):
    ways = math.prod(mesh.shape[a] for a in axes_of(entry))
    if dim % ways:
      raise ConfigError(
          f"{path} {tuple(shape)}: its {name!r} dimension ({dim}) cannot be split {ways} ways "
          f"over mesh axes {axes_of(entry)} (mesh {dict(mesh.shape)}); change config.mesh or "
          f"map {name!r} elsewhere in config.mesh.rules")
  return spec


def tree_shardings(tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (abstract) nnx Variables / arrays: by the Variables' logical
  names, replicated for everything else (step counters, optimizer scalars)."""
  def one(path, leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding")
      spec = P() if names is None else _checked_spec(
          jax.tree_util.keystr(path), leaf.get_value().shape, names, rules, mesh)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Batch arrays [batch, seq]: rows as the `batch` rule says (the data-holding axes), sequence
  replicated."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch", None), rules))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch rows are split."""
  return math.prod(mesh.shape[a] for a in axes_of(dict(rules).get("batch")))


# ------------------------------------------------------------------------------------------------
# Activation sharding constraints: the model calls `constrain` with logical names; it pins the
# layout only while a step traces under `activation_sharding(mesh, rules)`, so the same model
# runs unchanged without any mesh.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "polycom_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """Within this context `constrain` resolves logical names by `rules` on `mesh`."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def with_activation_sharding(fn: Callable, mesh: Mesh, rules) -> Callable:
  """fn traced under activation_sharding(mesh, rules): wrap a step before jax.jit."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x with its layout pinned to the rules' mesh axes for `names`; x itself when no mesh is
  active (single-device use, tests, users' own models)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_mesh_spec(names, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_mesh() -> Mesh | None:
  """The multi-device mesh a step is being traced for (activation_sharding), else None: one
  device, no mesh, or inside a per_shard body."""
  active = _ACTIVE.get()
  if active is None or active[0].size == 1:
    return None
  return active[0]


def active_layout(names: Sequence[str | None]) -> tuple[Mesh, P] | None:
  """(mesh, spec) that `constrain(x, names)` would pin, when a multi-device mesh is active:
  for code that must run per shard (a Pallas kernel under shard_map) rather than rely on GSPMD."""
  mesh = active_mesh()
  if mesh is None:
    return None
  return mesh, logical_to_mesh_spec(names, _ACTIVE.get()[1])


@contextlib.contextmanager
def per_shard():
  """Within this context code is traced on one shard's local arrays (a shard_map body): no mesh
  is active, so `constrain` does nothing and kernels run as on one device."""
  token = _ACTIVE.set(None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)
