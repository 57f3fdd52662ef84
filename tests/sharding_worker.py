"""The subprocess side of tests/test_sharding.py: runs on fake CPU devices (the test sets
XLA_FLAGS before jax starts) and writes what it measured to OUT_DIR for the test to assert on.

  python tests/sharding_worker.py layouts OUT_DIR BATCHES_NPZ
      one process, 8 devices: every layout vs one device, tensor-parallel PolyNorm, restore of a
      (fsdp 4, tensor 2) checkpoint onto 1 device and onto (data 8), config errors, and the
      one-device reference for the two-process run (trained on the batches in BATCHES_NPZ)
  python tests/sharding_worker.py multiprocess OUT_DIR CORPUS_GLOB DATA_DIR
      one of two processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the
      environment), 4 devices each: a few training steps on the real data pipeline, a checkpoint
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import tiny  # noqa: E402
from polycom_jax import activations, distributed, evaluation, moe, sharding  # noqa: E402
from polycom_jax import data as data_lib  # noqa: E402
from polycom_jax import setup as setup_lib  # noqa: E402
from polycom_jax import steps as steps_lib  # noqa: E402
from polycom_jax import checkpoint as ckpt_lib  # noqa: E402
from polycom_jax.config_errors import ConfigError  # noqa: E402
from conftest import jaxpr_eqns  # noqa: E402

SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}
LAYOUTS = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
    "data2_tensor4": {"data": 2, "fsdp": 1, "tensor": 4},
}
ACTIVATIONS = ("polynorm", "swiglu")
TRAIN_STEPS = 4
# The two-process run: data split over the processes (the DCN axis), fsdp and tensor inside each.
MULTIPROCESS_MESH = {"data": 2, "dcn_data": 2, "fsdp": 2, "tensor": 2}
MULTIPROCESS_STEPS = 3


def layout_config(activation: str, mesh: dict):
  """configs/tiny.py in float32 with 8 query / 4 kv heads (so `tensor` 4 splits both)."""
  c = tiny.get_config()
  c.model.update(activation=activation, num_heads=8, num_kv_heads=4, dtype="float32")
  c.mesh.update(mesh)
  return c


MOE_IMPLS = moe.MOE_IMPLS


def moe_config(impl: str, mesh: dict):
  """layout_config's PolyNorm model with 8 experts, top-2 (capacity large enough to drop none)."""
  c = layout_config("polynorm", mesh)
  c.model.update(num_experts=8, num_experts_per_tok=2, moe_ungated_d_ff=96, moe_impl=impl,
                 moe_capacity_factor=4.0)
  return c


def multiprocess_config(corpus_glob: str = "", data_dir: str = ""):
  """configs/tiny.py on the test corpus, on the two-process run's mesh."""
  c = tiny.get_config()
  c.data.update(text_glob=corpus_glob, data_dir=data_dir)
  c.mesh.update(MULTIPROCESS_MESH)
  return c


def synthetic_batch(seed: int, batch: int = 8, seq: int = 32) -> dict:
  """A fixed batch in the pipeline's format: two documents per row, padding at one row's end."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 258, (batch, seq + 1)).astype(np.int32)
  split = rng.integers(4, seq - 4, (batch, 1))
  col = np.arange(seq)[None]                                              # [1, T]
  segment_ids = np.where(col < split, 1, 2).astype(np.int32)              # [B, T]
  positions = np.where(col < split, col, col - split).astype(np.int32)
  segment_ids[0, -3:] = 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
          "segment_ids": segment_ids, "loss_mask": (segment_ids > 0).astype(np.float32)}


def make_grad_fn(s: setup_lib.Setup):
  """jit(params, batch) -> (mean token loss, grads), sharded like the train step."""
  def loss_fn(params, batch):
    logits = nnx.merge(s.graphdef, params)(batch["inputs"], positions=batch["positions"],
                                           segment_ids=batch["segment_ids"])   # [B, T, V]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)
    return -jnp.sum(logp[..., 0] * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
  params = s.state_shardings["params"]
  fn = sharding.with_activation_sharding(jax.value_and_grad(loss_fn), s.mesh, s.rules)
  return jax.jit(fn, in_shardings=(params, s.batch_sharding), out_shardings=(None, params))


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def bytes_on(tree, device) -> int:
  """Bytes of the tree's shards that live on `device`."""
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
             if shard.device == device)


def init_memory(s: setup_lib.Setup) -> dict:
  """Per-device output and scratch bytes of the compiled sharded init (XLA's memory analysis)."""
  init = setup_lib.init_fn(s.model_config, s.tx, s.config.seed)
  with jax.set_mesh(s.mesh):
    analysis = jax.jit(init, out_shardings=s.state_shardings).lower().compile().memory_analysis()
  return {"output": analysis.output_size_in_bytes, "temp": analysis.temp_size_in_bytes}


def gradient_collectives(s: setup_lib.Setup, state, batches) -> dict[str, int]:
  """{collective: the largest array it takes} in the gradient program's jaxpr (shard_map bodies
  included): how the MoE layer's weight gradients leave its shard_map."""
  with jax.set_mesh(s.mesh):
    jaxpr = jax.make_jaxpr(make_grad_fn(s))(state["params"],
                                            steps_lib.global_batch(s, batches[0]))
  largest: dict[str, int] = {}
  for eqn in jaxpr_eqns(jaxpr.jaxpr):
    if eqn.primitive.name in ("psum", "reduce_scatter", "all_gather"):
      size = max(int(np.prod(v.aval.shape)) for v in eqn.invars)
      largest[eqn.primitive.name] = max(largest.get(eqn.primitive.name, 0), size)
  return largest


def run_layout(config, devices, batches) -> tuple[setup_lib.Setup, dict, dict, dict]:
  """Sharded init, one gradient, TRAIN_STEPS train steps: (setup, state, scalars, arrays)."""
  s = setup_lib.setup(config, devices)
  with jax.set_mesh(s.mesh):
    state = setup_lib.init_state(s)
    arrays = {f"init{k}": v for k, v in flat(state["params"]).items()}
    first = s.mesh.devices.flat[0]
    scalars = {"param_bytes": bytes_on(state["params"], first),
               "opt_bytes": bytes_on(state["opt_state"], first),
               "param_bytes_total": sum(x.nbytes for x in jax.tree.leaves(state["params"])),
               "opt_bytes_total": sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))}
    glob = [steps_lib.global_batch(s, b) for b in batches]
    loss, grads = make_grad_fn(s)(state["params"], glob[0])
    arrays.update({f"grad{k}": v for k, v in flat(grads).items()})
    scalars["loss"] = float(loss)
    step, curve = steps_lib.make_train_step(s), []
    for batch in glob:
      state, metrics = step(state, batch)
      curve.append(float(metrics["loss"]))
  scalars["curve"] = curve
  return s, state, scalars, arrays


def tensor_parallel_polynorm(mesh) -> tuple[dict, dict]:
  """poly_norm (jnp path) and its gradients with the normalised axis split 4 ways over `tensor`
  vs on one device; and whether the compiled program reduces the statistics with an all-reduce."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 8, 96)).astype(np.float32)                   # [B, T, F]
  g = rng.standard_normal(x.shape).astype(np.float32)
  w, b = np.array([0.5, -0.3, 0.8], np.float32), np.array([0.1], np.float32)

  def value_and_grads(x, w, b):
    y, vjp = jax.vjp(lambda *a: activations.poly_norm(*a, impl="xla"), x, w, b)
    return (y, *vjp(g))

  one = jax.jit(value_and_grads)(x, w, b)
  split = NamedSharding(mesh, P("data", None, "tensor"))
  replicated = NamedSharding(mesh, P())
  fn = jax.jit(value_and_grads, in_shardings=(split, replicated, replicated),
               out_shardings=(split, split, replicated, replicated))
  hlo = fn.lower(x, w, b).compile().as_text()
  many = fn(x, w, b)
  names = ("y", "dx", "dw", "db")
  arrays = {f"tp_polynorm/{n}/one": np.asarray(a) for n, a in zip(names, one)}
  arrays.update({f"tp_polynorm/{n}/sharded": np.asarray(a) for n, a in zip(names, many)})
  return {"all_reduce": "all-reduce" in hlo, "x_shards": len(split.device_set)}, arrays


def restore_elsewhere(config, s, state, workdir: str, devices) -> dict:
  """Saves the state, then restores it onto one device and onto (data 8) and evaluates each."""
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(TRAIN_STEPS, state, {}, setup_lib.config_as_dict(config))
  checkpointer.close()
  batches = [synthetic_batch(100 + i) for i in range(2)]
  out = {"source": evaluation.evaluate(s, steps_lib.make_eval_step(s), state["params"],
                                      batches)["loss"]}
  for name, mesh, devs in (("one_device", SINGLE, devices[:1]),
                           ("data8", LAYOUTS["data8"], devices)):
    target = layout_config(config.model.activation, mesh)
    s2, params, step = evaluation.restore_params(target, workdir, devices=devs)
    out[name] = evaluation.evaluate(s2, steps_lib.make_eval_step(s2), params, batches)["loss"]
    out[f"{name}_devices"] = len(jax.tree.leaves(params)[0].sharding.device_set)
    out[f"{name}_step"] = step
  return out


def two_process_reference(batches_npz: str, device) -> tuple[dict, dict]:
  """The two-process run's losses and final state, computed on one device."""
  config = multiprocess_config()
  config.mesh.update(data=1, dcn_data=1, fsdp=1, tensor=1)
  saved = np.load(batches_npz)
  batches = [{k: saved[f"{i}/{k}"] for k in steps_lib.BATCH_KEYS}
             for i in range(MULTIPROCESS_STEPS)]
  s = setup_lib.setup(config, [device])
  losses = []
  with jax.set_mesh(s.mesh):
    state, step = setup_lib.init_state(s), steps_lib.make_train_step(s)
    for batch in batches:
      state, metrics = step(state, steps_lib.global_batch(s, batch))
      losses.append(float(metrics["loss"]))
  return {"losses": losses}, {f"two_process_reference/{k}": v for k, v in flat(state).items()}


def config_error(config, devices) -> str:
  try:
    setup_lib.setup(config, devices)
  except ConfigError as e:
    return str(e)
  return ""


def layouts(out_dir: str, batches_npz: str):
  devices = jax.devices()
  assert len(devices) == 8, devices
  batches = [synthetic_batch(0)] * TRAIN_STEPS     # one fixed batch: the loss must fall
  scalars, arrays = {}, {}
  for act in ACTIVATIONS:
    _, _, scalars[f"{act}/single"], a = run_layout(layout_config(act, SINGLE), devices[:1],
                                                   batches)
    arrays.update({f"{act}/single/{k}": v for k, v in a.items()})
    for name, mesh in LAYOUTS.items():
      config = layout_config(act, mesh)
      s, state, scalars[f"{act}/{name}"], a = run_layout(config, devices, batches)
      if act == "polynorm" and name == "fsdp8":
        scalars["init_memory/fsdp8"] = init_memory(s)
        scalars["init_memory/single"] = init_memory(setup_lib.setup(
            layout_config(act, SINGLE), devices[:1]))
      arrays.update({f"{act}/{name}/{k}": v for k, v in a.items()})
      if act == "polynorm" and name == "fsdp4_tensor2":
        scalars["restore"] = restore_elsewhere(config, s, state,
                                               os.path.join(out_dir, "run"), devices)
  # MoE: experts split 4 ways over `expert`, tokens 2 ways over `data` (and `expert`).
  for impl in MOE_IMPLS:
    moe_single = moe_config(impl, SINGLE)
    _, _, scalars[f"moe_{impl}/single"], a = run_layout(moe_single, devices[:1], batches)
    arrays.update({f"moe_{impl}/single/{k}": v for k, v in a.items()})
    _, _, scalars[f"moe_{impl}/expert4_data2"], a = run_layout(
        moe_config(impl, {"data": 2, "expert": 4}), devices, batches)
    arrays.update({f"moe_{impl}/expert4_data2/{k}": v for k, v in a.items()})
  # FSDP too: the expert weights split over `fsdp` and `expert`, their gradients reduce-scattered.
  for impl in ("ragged", "dispatch"):
    s, state, scalars[f"moe_{impl}/fsdp4_expert2"], a = run_layout(
        moe_config(impl, {"fsdp": 4, "expert": 2}), devices, batches)
    arrays.update({f"moe_{impl}/fsdp4_expert2/{k}": v for k, v in a.items()})
    scalars[f"moe_{impl}/fsdp4_expert2"]["collectives"] = gradient_collectives(s, state, batches)
  # A tensor axis too (it repeats the MoE layer's work, but must not change the result), with
  # the fused kernel per shard inside the layer's shard_map.
  tensor_moe = moe_config("ragged", {"data": 2, "expert": 2, "tensor": 2})
  tensor_moe.model.activation_impl = "pallas"
  _, _, scalars["moe_ragged/expert2_data2_tensor2_pallas"], a = run_layout(tensor_moe, devices,
                                                                           batches)
  arrays.update({f"moe_ragged/expert2_data2_tensor2_pallas/{k}": v for k, v in a.items()})
  # activation_impl="pallas" in MoE under a mesh (it must fall back to the partitionable path).
  fused_moe = moe_config("ragged", {"data": 2, "expert": 4})
  fused_moe.model.activation_impl = "pallas"
  _, _, scalars["moe_ragged/expert4_data2_pallas"], a = run_layout(fused_moe, devices, batches)
  arrays.update({f"moe_ragged/expert4_data2_pallas/{k}": v for k, v in a.items()})
  # The model with the fused Pallas kernel (interpret mode here) run per shard under shard_map.
  fused = layout_config("polynorm", LAYOUTS["data2_tensor4"])
  fused.model.activation_impl = "pallas"
  _, _, scalars["polynorm/data2_tensor4_pallas"], a = run_layout(fused, devices, batches)
  arrays.update({f"polynorm/data2_tensor4_pallas/{k}": v for k, v in a.items()})
  # Scanned layers (remat inside the scan) with the fused kernel per shard inside the loop body,
  # parameters FSDP-split and the MLP tensor-parallel; against the scanned model on one device.
  scan_single = layout_config("polynorm", SINGLE)
  scan_single.model.update(scan_layers=True, remat="full")
  _, _, scalars["polynorm_scan/single"], a = run_layout(scan_single, devices[:1], batches)
  arrays.update({f"polynorm_scan/single/{k}": v for k, v in a.items()})
  scan_sharded = layout_config("polynorm", {"data": 1, "fsdp": 2, "tensor": 4})
  scan_sharded.model.update(scan_layers=True, remat="full", activation_impl="pallas")
  _, _, scalars["polynorm_scan/fsdp2_tensor4_pallas"], a = run_layout(scan_sharded, devices,
                                                                      batches)
  arrays.update({f"polynorm_scan/fsdp2_tensor4_pallas/{k}": v for k, v in a.items()})
  tp_mesh = sharding.make_mesh(layout_config("polynorm", LAYOUTS["data2_tensor4"]).mesh)
  scalars["tp_polynorm"], a = tensor_parallel_polynorm(tp_mesh)
  arrays.update(a)
  uneven = layout_config("polynorm", LAYOUTS["data2_tensor4"])
  uneven.model.num_kv_heads = 2
  scalars["errors"] = {
      "uneven_kv_heads": config_error(uneven, devices),
      "mesh_too_big": config_error(layout_config("polynorm", {"fsdp": 4, "tensor": 4}), devices),
      "dcn_without_slices": config_error(
          layout_config("polynorm", {"data": 2, "dcn_data": 2, "fsdp": 4}), devices),
  }
  scalars["two_process_reference"], a = two_process_reference(batches_npz, devices[0])
  arrays.update(a)
  np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
  with open(os.path.join(out_dir, "scalars.json"), "w") as f:
    json.dump(scalars, f)


def tensor_groups_cross_processes(mesh) -> bool:
  """Whether any group of devices that differ only in (tensor, expert) spans two processes."""
  procs = np.vectorize(lambda d: d.process_index)(mesh.devices)   # [data, fsdp, tensor, expert]
  groups = procs.reshape(-1, mesh.shape["tensor"] * mesh.shape["expert"])
  return bool(np.any(groups != groups[:, :1]))


def multiprocess(out_dir: str, corpus_glob: str, data_dir: str):
  distributed.initialize()
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(),
                                                                 jax.devices())
  config = multiprocess_config(corpus_glob, data_dir)
  s = setup_lib.setup(config)
  pid = jax.process_index()
  it = data_lib.make_train_iterator(
      config.data, s.tokenizer, batch_size=s.per_process_batch, seed=config.data.shuffle_seed,
      process_index=pid, process_count=jax.process_count())
  losses = []
  with jax.set_mesh(s.mesh):
    state, step = setup_lib.init_state(s), steps_lib.make_train_step(s)
    for _ in range(MULTIPROCESS_STEPS):
      state, metrics = step(state, steps_lib.global_batch(s, next(it)))
      losses.append(float(metrics["loss"]))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(out_dir, "run"))
    checkpointer.save(MULTIPROCESS_STEPS, state, it.get_state(), setup_lib.config_as_dict(config))
    checkpointer.close()
  result = {"losses": losses, "data_state": json.loads(json.dumps(it.get_state())),
            "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(),
            "tensor_groups_cross_processes": tensor_groups_cross_processes(s.mesh),
            "mesh": dict(s.mesh.shape)}
  with open(os.path.join(out_dir, f"process_{pid}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  mode, args = sys.argv[1], sys.argv[2:]
  {"layouts": layouts, "multiprocess": multiprocess}[mode](*args)
