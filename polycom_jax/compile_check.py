"""Compile a config's real sharded train and eval steps for a TPU topology, without the TPU.

The library behind `compile_check.py` (the entry point, which sets JAX_PLATFORMS=cpu before JAX
starts). With libtpu installed (`pip install "jax[tpu]==<jax version>"`, best in a separate venv:
it is a tool/test extra, not a runtime requirement), JAX describes a named TPU slice on a plain
CPU machine (jax.experimental.topologies) and compiles for it with the real TPU compiler (XLA TPU
+ Mosaic for the Pallas kernels). `run` builds the mesh from the slice's devices with the
config's parallelism, lowers and compiles the train step (and the eval step) from abstract shapes
only, and prints per-chip memory against the chip's HBM (and the host memory of offloaded
remat), XLA's cost analysis, the bytes of the collectives in the compiled HLO (hlo_stats.py),
the model FLOPs from the exact formula and the compile times; `max_batch` also searches for the
largest global batch whose train step fits.

With config.model.scan_layers (the paper configs' default) the step holds one scanned block, so
it compiles in seconds at any depth; XLA's cost analysis then counts the loop body once, so the
FLOPs, bytes and collective bytes reported are extrapolated from unrolled 1- and 2-layer
compiles of the same step (they are affine in the number of layers): f(L) = f(1) + (L - 1) *
(f(2) - f(1)); those compiles run the MLP's and the loss's sequence chunks (also loops) whole.
Likewise the gradient-accumulation loop (config.train.micro_batch_size): the train step's cost
is multiplied by the number of micro-batches.

For the target backend, "auto" settings resolve as on a TPU: config.model.activation_impl
"auto" -> "pallas" (so the fused kernels go through the Mosaic compile); setup resolves
attention_impl "auto" -> "splash" (XLA when seq_len is not a multiple of 128), moe_matmul ->
"megablox" and dtype -> "bfloat16" for the topology's platform. XLA's cost analysis does not
see inside a Pallas call: with splash (megablox), the attention (expert matmul) FLOPs are
missing from "XLA FLOPs" (the model formula counts them). config.data.tokenizer falls back to
the byte tokenizer without a tokenizer_path (only the vocabulary check and the byte table use it).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from polycom_jax import hlo_stats
from polycom_jax import model as model_lib
from polycom_jax import setup as setup_lib
from polycom_jax import sharding as sharding_lib
from polycom_jax import steps as steps_lib
from polycom_jax.config_errors import ConfigError, RunError

GiB = 2 ** 30
# HBM per chip by jax device_kind (the kinds libtpu reports for v4:, v5p:, v5e:, v6e: slices).
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5": 95 * GiB,          # v5p
    "TPU v5 lite": 16 * GiB,     # v5e
    "TPU v6 lite": 32 * GiB,     # v6e (Trillium)
}


class CompileError(RunError):
  """The TPU compiler rejected a step for a reason other than memory."""


def install_hint() -> str:
  return (f'compiling for a TPU topology needs libtpu: pip install "jax[tpu]=={jax.__version__}" '
          "(a separate venv is recommended, e.g. python -m venv .venv-tpu && "
          ".venv-tpu/bin/pip install -r requirements-tpu.txt; it is a tool/test extra, not a "
          "runtime requirement)")


def get_topology_devices(name: str) -> list:
  """The devices of a named TPU slice; ConfigError when libtpu is missing or the name is bad."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise ConfigError(install_hint()) from None
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # noqa: BLE001 - XLA raises several types for bad names
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"--topology={name!r}: cannot describe this TPU slice ({msg}). "
                      "Names look like v5p:2x2x2, v5e:4x4, v4:2x2x2, v6e:2x2.") from None
  return list(topo.devices)


def prepare_config(config):
  """The fused activation as on a TPU (setup resolves dtype and attention for the topology's
  platform) and no need for a tokenizer file."""
  with config.unlocked():
    if config.model.get("activation_impl", "auto") == "auto":
      config.model.activation_impl = "pallas"
    if config.data.tokenizer != "byte" and not config.data.tokenizer_path:
      config.data.tokenizer = "byte"
  return config


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(s, batch_size: int) -> dict:
  seq = s.config.data.seq_len
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
            "segment_ids": jnp.int32, "positions": jnp.int32}
  return {k: jax.ShapeDtypeStruct((batch_size, seq), dtypes[k], sharding=s.batch_sharding)
          for k in dtypes}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


@dataclasses.dataclass
class StepReport:
  name: str
  compile_s: float
  argument: int
  output: int
  alias: int
  temp: int
  code: int
  flops: float
  bytes_accessed: float
  oom: str = ""            # the TPU compiler's out-of-memory message, when it gave up
  host_temp: int = 0       # host memory the step uses (remat "offload": the block inputs)
  collectives: dict = dataclasses.field(default_factory=dict)   # {kind: result bytes}
  kernels: dict = dataclasses.field(default_factory=dict)       # {Pallas kernel: calls}

  @property
  def mosaic_kernels(self) -> int:         # Pallas TPU kernel calls (Mosaic custom calls)
    return sum(self.kernels.values())

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code

  def fits(self, hbm) -> bool:
    return not self.oom and (hbm is None or self.total <= hbm)


def _collectives_cell(r: StepReport, g) -> str:
  """Total collective bytes per chip and the kinds that move any."""
  if r.oom or not r.collectives:
    return "-"
  kinds = ", ".join(f"{k} {g(v)}" for k, v in r.collectives.items() if v)
  return f"{g(sum(r.collectives.values()))}" + (f" ({kinds})" if kinds else "")


def _kernels_cell(r: StepReport) -> str:
  return ", ".join(f"{k} {v}" for k, v in sorted(r.kernels.items()))


def _oom_temp_bytes(message: str) -> int:
  """Temp bytes from the TPU compiler's out-of-memory message, 0 if it does not say."""
  m = re.search(r"(?:HLO temporaries|Used) \(?([0-9.]+)([KMGT])", message)
  return int(float(m[1]) * 1024 ** " KMGT".index(m[2])) if m else 0


def compile_step(name: str, jitted, *args, argument_bytes: int = 0) -> StepReport:
  """Compiles; when the compiler runs out of HBM, a report with its numbers (argument_bytes:
  the per-chip inputs, known from the shardings) and the message."""
  t0 = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError, Mosaic errors, lowering errors
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      raise CompileError(f"the {name} step does not compile ({type(e).__name__}): "
                         + " | ".join(lines[:6])[:1500]) from e
    line = next((l for l in text.splitlines() if "Ran out of memory" in l or "Used" in l),
                text.splitlines()[0])
    nan = float("nan")
    return StepReport(name, time.perf_counter() - t0, argument_bytes, 0, 0,
                      _oom_temp_bytes(line), 0, nan, nan, oom=line.strip()[:500])
  dt = time.perf_counter() - t0
  m = compiled.memory_analysis()
  cost = _cost(compiled)
  text = compiled.as_text()
  return StepReport(name, dt, m.argument_size_in_bytes, m.output_size_in_bytes,
                    m.alias_size_in_bytes, m.temp_size_in_bytes,
                    m.generated_code_size_in_bytes, float(cost.get("flops", float("nan"))),
                    float(cost.get("bytes accessed", float("nan"))),
                    host_temp=m.host_temp_size_in_bytes,
                    collectives=hlo_stats.collective_bytes(text),
                    kernels=hlo_stats.mosaic_kernels(text))


def compile_steps(config, devices, skip_eval: bool = False):
  """(setup, [train report, eval report], param bytes, optimizer-state bytes) of a config
  compiled for `devices`; ConfigError when the config's mesh does not fit them."""
  try:
    s = setup_lib.setup(config, devices=devices)
  except ConfigError as e:
    raise ConfigError(f"the topology has {len(devices)} chips ({devices[0].device_kind}) but "
                      f"the config does not fit them: {e}") from None
  params_b = per_chip_bytes(s.abstract_state["params"])
  opt_b = per_chip_bytes(s.abstract_state["opt_state"]) + per_chip_bytes(s.abstract_state["step"])
  train_step = steps_lib.make_train_step(s)
  # Built outside the mesh context: its byte table is a host constant, not a TPU array.
  eval_step = None if skip_eval else steps_lib.make_eval_step(s)
  with jax.set_mesh(s.mesh):
    batch = abstract_batch(s, config.train.global_batch_size)
    reports = [compile_step("train", train_step, s.abstract_state, batch,
                            argument_bytes=params_b + opt_b + per_chip_bytes(batch))]
    if eval_step is not None:
      eval_batch = abstract_batch(s, config.eval.batch_size)
      reports.append(compile_step("eval", eval_step, s.abstract_state["params"], eval_batch,
                                  argument_bytes=params_b + per_chip_bytes(eval_batch)))
  return s, reports, params_b, opt_b


def _with_model(config, **fields):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.update(fields)
  return config


def unrolled_costs(config, devices, reports):
  """Sets each report's flops / bytes_accessed to the full-depth cost, extrapolated from
  unrolled 1- and 2-layer compiles (a scanned step's cost analysis counts its body once). The
  MLP's and the loss's sequence chunks are loops too, so these compiles run them whole: the
  chunks add no matmuls (each chunk is recomputed in place of the whole)."""
  layers = config.model.num_layers
  unrolled = _with_model(config, scan_layers=False, mlp_chunk=0)
  with unrolled.unlocked():
    unrolled.train.loss_chunk = 0
  small = [{r.name: r for r in compile_steps(
      _with_model(unrolled, num_layers=n), devices,
      skip_eval=all(r.name != "eval" for r in reports))[1]} for n in (1, 2)]
  full_depth = lambda one, two: one + (layers - 1) * (two - one)
  for r in reports:
    one, two = small[0][r.name], small[1][r.name]
    r.flops = full_depth(one.flops, two.flops)
    r.bytes_accessed = full_depth(one.bytes_accessed, two.bytes_accessed)
    r.collectives = {k: full_depth(one.collectives[k], two.collectives[k])
                     for k in one.collectives}


def largest_batch(config, devices, hbm: int, dp: int, first, out=sys.stdout) -> int:
  """The largest global batch (a multiple of the data-parallel size dp, no gradient
  accumulation) whose train step fits in hbm per chip; 0 when not even dp fits. Memory is
  close to affine in the batch, so each compile's total predicts the next candidate; the
  search keeps a bracket (largest that fits, smallest that does not) and stops when they meet.
  When the prediction lands on the bracket's edge, the row next to it is tried: a right
  prediction is confirmed in one compile instead of a bisection."""
  fits, fails = 0, None                            # in rows per data-parallel group
  seen = {}

  def try_rows(rows: int):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.train.global_batch_size, c.train.micro_batch_size = rows * dp, 0
      c.eval.batch_size = dp
    report = compile_steps(c, devices, skip_eval=True)[1][0]
    seen[rows] = report
    print(f"  global batch {rows * dp}: {report.total / GiB:.2f} GiB per chip"
          f"{' (compiler out of memory)' if report.oom else ''} -> "
          f"{'fits' if report.fits(hbm) else 'does not fit'}", file=out, flush=True)
    return report.fits(hbm)

  t = config.train
  rows = max(1, (t.micro_batch_size or t.global_batch_size) // dp)
  if t.micro_batch_size:
    first = None                     # that compile was of another (accumulating) step
  if first is not None:
    seen[rows] = first
    fits, fails = (rows, None) if first.fits(hbm) else (0, rows)
  elif try_rows(rows):
    fits = rows
  else:
    fails = rows
  while fails is None or fails - fits > 1:
    known = sorted((r, rep.total) for r, rep in seen.items() if not rep.oom)
    guess = None
    if len(known) >= 2:
      (r0, t0), (r1, t1) = known[0], known[-1]
      slope = (t1 - t0) / (r1 - r0)
      if slope > 0:
        guess = r0 + int((hbm - t0) // slope)
    elif known and fails is None:
      guess = 2 * known[0][0]
    if guess is None:
      guess = 2 * max(fits, 1) if fails is None else (fits + fails) // 2
    else:       # the affine model's largest batch; at the bracket's edge, confirm the edge
      guess = max(guess, fits + 1)
      if fails is not None:
        guess = min(guess, fails - 1)
    if try_rows(guess):
      fits = guess
    else:
      fails = guess
  return fits * dp


def run(config, topology: str, skip_eval: bool = False, max_batch: bool = False,
        out=sys.stdout) -> dict:
  """Compiles and reports; returns the numbers. Raises ConfigError for bad input,
  CompileError when a step does not compile."""
  devices = get_topology_devices(topology)
  kind = devices[0].device_kind
  config = prepare_config(config)
  try:
    s, reports, params_b, opt_b = compile_steps(config, devices, skip_eval)
  except ConfigError as e:
    raise ConfigError(f"--topology={topology}: {e}") from None
  mc = s.model_config
  t = config.train
  notes = []
  compiled = [r for r in reports if not r.oom]
  looped = (mc.scan_layers or mc.mlp_chunk
            or steps_lib.loss_chunk_len(config.data.seq_len, t.loss_chunk) < config.data.seq_len)
  if looped and compiled:
    unrolled_costs(config, devices, compiled)
    notes.append("unrolled 1-, 2-layer extrapolation")
  accum = t.global_batch_size // t.micro_batch_size if t.micro_batch_size else 1
  if accum > 1 and not reports[0].oom:
    # The accumulation loop's body is counted once too (the optimizer update, outside it, is a
    # negligible part of the step's cost).
    reports[0].flops *= accum
    reports[0].bytes_accessed *= accum
    reports[0].collectives = {k: v * accum for k, v in reports[0].collectives.items()}
    notes.append(f"train: x {accum} micro-batches")
  hbm = HBM_BYTES.get(kind)
  n = len(devices)
  seq = config.data.seq_len
  model_flops = model_lib.flops_per_token(mc, seq) * t.global_batch_size * seq / n
  result = {"topology": topology, "device_kind": kind, "num_chips": n,
            "mesh": dict(s.mesh.shape), "hbm_bytes": hbm, "param_bytes": params_b,
            "opt_state_bytes": opt_b, "num_params": model_lib.num_params(mc),
            "num_layers": mc.num_layers, "scan_layers": mc.scan_layers,
            "attention_impl": mc.attention_impl, "remat": mc.remat, "mlp_chunk": mc.mlp_chunk,
            "activation": mc.activation, "global_batch_size": t.global_batch_size,
            "seq_len": seq, "model_flops_per_chip": model_flops,
            "steps": {r.name: dataclasses.asdict(r) | {"total": r.total, "mosaic_kernels":
                                                     r.mosaic_kernels} for r in reports}}
  result["fits"] = all(r.fits(hbm) for r in reports)

  g = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.2f} MiB"
  w = lambda line="": print(line, file=out, flush=True)
  mesh = ", ".join(f"{a}={v}" for a, v in s.mesh.shape.items() if v > 1) or "1 device"
  w(f"## compile check: {topology} ({n} x {kind}, HBM {g(hbm) if hbm else 'unknown'} per chip)")
  w(f"mesh ({mesh}); model {model_lib.num_params(mc) / 1e6:.1f}M params, "
    f"{mc.num_layers} layers{' (scanned)' if mc.scan_layers else ''}, activation "
    f"{mc.activation} ({mc.activation_impl}), attention {mc.attention_impl}, dtype {mc.dtype}, "
    f"remat {mc.remat}, mlp chunk {mc.mlp_chunk or 'none'}, loss chunk "
    f"{steps_lib.loss_chunk_len(seq, t.loss_chunk)}; global batch "
    f"{t.global_batch_size} x seq {seq} (micro-batch {t.micro_batch_size or 'none'})")
  w()
  w("| per chip | " + " | ".join(r.name for r in reports) + " |")
  w("|---|" + "---:|" * len(reports))
  flops_note = f" ({'; '.join(notes)})" if notes else ""
  rows = [
      ("parameters", [g(params_b)] * len(reports)),
      ("optimizer state", [g(opt_b)] + [g(0)] * (len(reports) - 1)),
      ("arguments (state + batch)", [g(r.argument) for r in reports]),
      ("outputs not aliased to inputs", [g(r.output - r.alias) for r in reports]),
      ("activations / temp", [g(r.temp) for r in reports]),
      ("total", [g(r.total) + (" + (compiler out of memory)" if r.oom else "")
                 for r in reports]),
      ("host memory (offloaded, not in the total)", [g(r.host_temp) for r in reports]),
      ("HBM", [g(hbm) if hbm else "?" for r in reports]),
      ("fits", ["yes" if r.fits(hbm) else "NO" for r in reports]),
      (f"XLA FLOPs{flops_note}", [f"{r.flops:.3e}" if not r.oom else "-" for r in reports]),
      (f"XLA bytes accessed{flops_note}",
       [f"{r.bytes_accessed:.3e}" if not r.oom else "-" for r in reports]),
      ("model FLOPs (6N + attention)", [f"{model_flops:.3e}", f"{model_flops / 3:.3e}"]
       [:len(reports)]),
      (f"collective bytes{flops_note}", [_collectives_cell(r, g) for r in reports]),
      ("Pallas (Mosaic) kernel calls", [f"{r.mosaic_kernels} ({_kernels_cell(r)})"
                                        if r.kernels else str(r.mosaic_kernels) for r in reports]),
      ("compile time", [f"{r.compile_s:.1f} s" for r in reports]),
  ]
  for label, vals in rows:
    w(f"| {label} | " + " | ".join(vals) + " |")
  for r in reports:
    if r.oom:
      w(f"{r.name}: the TPU compiler ran out of HBM: {r.oom}")
  if max_batch:
    if hbm is None:
      raise ConfigError(f"--max_batch needs the HBM size of {kind!r}, which is not known "
                        f"(known: {sorted(HBM_BYTES)})")
    dp = sharding_lib.data_parallel_size(s.mesh, s.rules)
    w()
    w(f"largest global batch whose train step fits (multiples of the data-parallel size {dp}):")
    best = largest_batch(config, devices, hbm, dp, reports[0], out=out)
    result["max_global_batch"] = best
    w(f"largest global batch that fits: {best} ({best // dp} per data-parallel group"
      f"{', ' + str(best * seq // n) + ' tokens per chip' if best else ''})")
  return result
