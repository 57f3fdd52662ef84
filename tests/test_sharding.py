"""Sharding: every mesh layout computes what one device computes, FSDP shrinks the memory per
device, two processes train like one, and a checkpoint restores onto another mesh.

The layout checks run in ONE subprocess with 8 fake CPU devices (tests/sharding_worker.py) so
the fake devices never slow the rest of the suite; the two-process run uses two more processes
(jax.distributed on localhost, gloo CPU collectives). Like the whole suite they compile with
XLA's cheap CPU codegen (conftest.FAST_COMPILE); every comparison is between programs built the
same way.
Tolerances are float32 reduction-order noise: losses and eval losses to 2e-6 relative,
gradients and PolyNorm outputs to 1e-5 of each array's largest magnitude (1e-4 for Adam's
moments after 3 steps).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import data as data_lib
from polycom_jax import distributed, sharding
from polycom_jax import setup as setup_lib
from polycom_jax import steps as steps_lib
from polycom_jax import optimizer as opt_lib
from polycom_jax.config_errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
import sharding_worker as worker  # noqa: E402
from conftest import xla_flags

LOSS_RTOL = 2e-6
ARRAY_TOL = 1e-5
MOMENT_TOL = 1e-4
LAYOUT_IDS = [f"{a}-{l}" for a in worker.ACTIVATIONS for l in worker.LAYOUTS]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices))
  env.update(extra)
  return env


def _run_processes(argvs: list[list[str]], envs: list[dict], timeout: float):
  """Runs the worker processes together; kills them all if one fails or time runs out."""
  logs = [tempfile.TemporaryFile("w+") for _ in argvs]        # files: a full pipe would block
  procs = [subprocess.Popen([sys.executable, WORKER, *argv], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
           for argv, env, log in zip(argvs, envs, logs)]
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = any(p.poll() not in (None, 0) for p in procs)
      if failed or time.time() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  for p, log in zip(procs, logs):
    log.seek(0)
    if p.returncode != 0:
      pytest.fail(f"worker {p.args[2:]} exited with {p.returncode} (timeout {timeout}s):\n"
                  + log.read()[-6000:])
    log.close()


def _global_batches(corpus_glob: str, data_dir: str) -> list[dict]:
  """What the two processes of the two-process run read: process 0's rows, then process 1's."""
  config = worker.multiprocess_config(corpus_glob, data_dir)
  tokenizer = data_lib.get_tokenizer(config.data)
  its = [data_lib.make_train_iterator(
      config.data, tokenizer, batch_size=config.train.global_batch_size // 2,
      seed=config.data.shuffle_seed, process_index=i, process_count=2) for i in range(2)]
  return [{k: np.concatenate([part[k] for part in parts]) for k in steps_lib.BATCH_KEYS}
          for parts in ([next(it) for it in its] for _ in range(worker.MULTIPROCESS_STEPS))]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, corpus_glob, data_dir):
  """(scalars, arrays) written by the 8-device worker (given the two-process run's batches)."""
  out = tmp_path_factory.mktemp("layouts")
  batches = _global_batches(corpus_glob, data_dir)        # also prepares the corpus in data_dir
  np.savez(out / "batches.npz", **{f"{i}/{k}": v for i, b in enumerate(batches)
                                   for k, v in b.items()})
  _run_processes([["layouts", str(out), str(out / "batches.npz")]], [_env(8)], timeout=600)
  with open(out / "scalars.json") as f:
    scalars = json.load(f)
  return scalars, dict(np.load(out / "arrays.npz"))


def _pairs(arrays: dict, act: str, layout: str, kind: str):
  prefix = f"{act}/{layout}/{kind}"
  keys = [k for k in arrays if k.startswith(prefix)]
  assert keys, prefix
  return [(k[len(prefix):], arrays[k], arrays[f"{act}/single/{kind}{k[len(prefix):]}"])
          for k in keys]


@pytest.mark.parametrize("act, layout", [(a, l) for a in worker.ACTIVATIONS
                                         for l in worker.LAYOUTS]
                         + [("polynorm", "data2_tensor4_pallas")]
                         + [(f"moe_{impl}", "expert4_data2") for impl in worker.MOE_IMPLS]
                         + [(f"moe_{impl}", "fsdp4_expert2") for impl in ("ragged", "dispatch")]
                         + [("moe_ragged", "expert4_data2_pallas")]
                         + [("moe_ragged", "expert2_data2_tensor2_pallas")]
                         + [("polynorm_scan", "fsdp2_tensor4_pallas")],
                         ids=LAYOUT_IDS + ["polynorm-data2_tensor4-fused_pallas_kernel"]
                         + [f"moe_{impl}-expert4_data2" for impl in worker.MOE_IMPLS]
                         + [f"moe_{impl}-fsdp4_expert2" for impl in ("ragged", "dispatch")]
                         + ["moe_ragged-expert4_data2-activation_impl_pallas"]
                         + ["moe_ragged-expert2_data2_tensor2-fused_pallas_kernel"]
                         + ["polynorm-scan_layers-fsdp2_tensor4-fused_pallas_kernel"])
def test_layout_matches_one_device(layouts, act, layout):
  """Sharded init gives the single device's parameters bit for bit; the first step's loss and
  every gradient, and the loss over several training steps, equal the single-device ones."""
  scalars, arrays = layouts
  got, ref = scalars[f"{act}/{layout}"], scalars[f"{act}/single"]
  for name, a, b in _pairs(arrays, act, layout, "init"):
    np.testing.assert_array_equal(a, b, err_msg=name)
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=LOSS_RTOL)
  for name, a, b in _pairs(arrays, act, layout, "grad"):
    np.testing.assert_allclose(a, b, rtol=0, atol=ARRAY_TOL * np.abs(b).max(), err_msg=name)
  assert len(got["curve"]) == worker.TRAIN_STEPS
  np.testing.assert_allclose(got["curve"], ref["curve"], rtol=LOSS_RTOL)
  assert ref["curve"][-1] < ref["curve"][0] - 0.01   # it trained: the comparison is not vacuous


@pytest.mark.parametrize("impl", ["ragged", "dispatch"])
def test_moe_expert_gradients_leave_by_reduce_scatter(layouts, impl):
  """Under (fsdp 4, expert 2) the MoE layer gathers its weight shards inside its shard_map, so
  each weight's gradient leaves by reduce-scatter: nothing the size of a whole expert weight
  ([8 experts, 64, 96]) is all-reduced on every device, as it was with replicated inputs."""
  largest = layouts[0][f"moe_{impl}/fsdp4_expert2"]["collectives"]
  whole = 8 * 64 * 96
  assert largest["reduce_scatter"] >= whole // 2, largest   # dispatch keeps its 4 experts
  assert largest["psum"] <= whole // 8, largest               # an (fsdp, expert) shard at most


@pytest.mark.parametrize("layout, ways", [("data8", 1), ("fsdp8", 8), ("fsdp4_tensor2", 8),
                                          ("data2_tensor4", 4)])
def test_parameter_and_optimizer_bytes_per_device_shrink(layouts, layout, ways):
  """Per-device parameter and optimizer-state bytes (from the arrays' shards) are the total over
  the number of ways the parameters are split (within 1%: a few tiny vectors stay replicated;
  under (data 2, tensor 4) the norm scales are replicated, so about 4-fold)."""
  scalars, _ = layouts
  got = scalars[f"polynorm/{layout}"]
  for kind in ("param", "opt"):
    total, per_device = got[f"{kind}_bytes_total"], got[f"{kind}_bytes"]
    assert total == scalars["polynorm/single"][f"{kind}_bytes"]
    assert total / ways <= per_device <= 1.01 * total / ways, (kind, per_device, total)


def test_sharded_init_never_holds_the_whole_state_on_one_device(layouts):
  """Under FSDP 8 the compiled init's per-device output and scratch memory are about an eighth
  of one device's (at most a quarter asserted): the state is generated shard by shard."""
  single, fsdp = layouts[0]["init_memory/single"], layouts[0]["init_memory/fsdp8"]
  assert 0 < fsdp["output"] <= single["output"] / 4
  assert fsdp["temp"] <= single["temp"] / 4
  assert fsdp["output"] + fsdp["temp"] < layouts[0]["polynorm/single"]["param_bytes"]


def test_tensor_parallel_polynorm_equals_unsharded(layouts):
  """PolyNorm with its normalised (hidden) axis split over `tensor`: GSPMD all-reduces the RMS
  statistics, and output and all gradients equal the unsharded computation."""
  scalars, arrays = layouts
  assert scalars["tp_polynorm"]["all_reduce"] and scalars["tp_polynorm"]["x_shards"] == 8
  for name in ("y", "dx", "dw", "db"):
    one, sharded = arrays[f"tp_polynorm/{name}/one"], arrays[f"tp_polynorm/{name}/sharded"]
    np.testing.assert_allclose(sharded, one, rtol=0, atol=ARRAY_TOL * np.abs(one).max(),
                               err_msg=name)


def test_checkpoint_restores_onto_another_mesh(layouts):
  """A (fsdp 4, tensor 2) checkpoint restores onto one device and onto (data 8): same eval loss."""
  restore = layouts[0]["restore"]
  assert restore["one_device_devices"] == 1 and restore["data8_devices"] == 8
  assert restore["one_device_step"] == restore["data8_step"] == worker.TRAIN_STEPS
  for target in ("one_device", "data8"):
    np.testing.assert_allclose(restore[target], restore["source"], rtol=LOSS_RTOL)


def test_bad_layouts_fail_with_what_was_found(layouts):
  errors = layouts[0]["errors"]
  assert re.search(r"\['wk'\] \(64, 2, 8\): its 'kv_heads' dimension \(2\) cannot be split 4 "
                   r"ways over mesh axes \('tensor',\)", errors["uneven_kv_heads"])
  assert "16 devices, which does not divide the 8 devices found" in errors["mesh_too_big"]
  assert ("dcn_data=2 splits `data` over 2 TPU slices or 2 equal blocks of processes (hosts), "
          "but the 8 devices are in 1 slice(s) and 1 process(es)") in errors["dcn_without_slices"]


# ------------------------------------------------------------------------------------------------
# Two processes x 4 devices vs one device

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_device(layouts, tmp_path, corpus_glob, data_dir):
  """Two OS processes with 4 CPU devices each (mesh data 2 over the processes as the DCN axis,
  fsdp 2 x tensor 2 inside each) read their own halves of the data, train, and save a
  checkpoint together: the losses and the saved parameters equal one device trained on the
  concatenated batches (computed by the layouts worker)."""
  scalars, arrays = layouts
  port = _free_port()
  _run_processes(
      [["multiprocess", str(tmp_path), corpus_glob, data_dir] for _ in range(2)],
      [_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i)) for i in range(2)], timeout=300)
  results = []
  for i in range(2):
    with open(tmp_path / f"process_{i}.json") as f:
      results.append(json.load(f))
  assert results[0]["losses"] == results[1]["losses"]
  assert results[0]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert not results[0]["tensor_groups_cross_processes"]

  np.testing.assert_allclose(results[0]["losses"], scalars["two_process_reference"]["losses"],
                             rtol=LOSS_RTOL)

  config = worker.multiprocess_config(corpus_glob, data_dir)
  config.mesh.update(data=1, dcn_data=1, fsdp=1, tensor=1)
  s = setup_lib.setup(config, jax.devices()[:1])
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "run"))
  restored, data_state = checkpointer.restore(worker.MULTIPROCESS_STEPS, s.abstract_state)
  # Prepared rows: both processes saved the global step, which carries over to one process.
  assert data_state == results[0]["data_state"] == results[1]["data_state"]
  assert checkpointer.read_data_states(worker.MULTIPROCESS_STEPS) == [
      r["data_state"] for r in results]
  checkpointer.close()
  # Adam's first steps move each parameter by about lr * sign(gradient), so a gradient within
  # rounding of 0 may step either way: parameters agree to 1% of the largest possible move;
  # the moments (sums of gradients and their squares over 3 steps) to MOMENT_TOL of their own
  # scale, floored at MOMENT_TOL of 1% of the largest moment of their kind: a few are sums of
  # nearly cancelling terms whose rounding error is set by the terms, not the sum (PolyNorm's
  # bias gradient: 1.4e-5 relative seen on one CPU, 1.06e-4 on another).
  schedule = opt_lib.learning_rate_schedule(s.config.train)
  params_atol = 0.01 * sum(float(schedule(i)) for i in range(worker.MULTIPROCESS_STEPS))
  state = worker.flat(restored)
  assert len(state) > 20
  kind = lambda name: next((k for k in (".mu[", ".nu[") if k in name), None)
  scale = {k: max(np.abs(arrays[f"two_process_reference/{n}"]).max() for n in state
                  if kind(n) == k) for k in (".mu[", ".nu[")}
  for name, a in state.items():
    b = arrays[f"two_process_reference/{name}"]
    if name.startswith("['params']"):
      atol = params_atol
    else:
      floor = 0.01 * scale[kind(name)] if kind(name) else 0.0
      atol = MOMENT_TOL * max(np.abs(b).max(), floor)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Config-level pieces (no devices needed)

def test_rules_from_config_override_defaults_by_name():
  rules = dict(sharding.rules_from_config({"rules": (("embed", None), ("mlp", ["tensor"]))}))
  assert rules["embed"] is None and rules["mlp"] == ("tensor",)
  assert rules["vocab"] == "tensor" and rules["batch"] == sharding.BATCH_AXES
  with pytest.raises(ConfigError, match=r"config\.mesh\.rules: 'embed' maps to unknown mesh "
                                        r"axes \['model'\]"):
    sharding.rules_from_config({"rules": (("embed", "model"),)})
  with pytest.raises(ConfigError, match="pair"):
    sharding.rules_from_config({"rules": (("embed",),)})


def test_mesh_shape_fills_in_minus_one_and_reports_mismatches():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 16) == {
      "data": 4, "fsdp": 2, "tensor": 2, "expert": 1}
  with pytest.raises(ConfigError, match=r"needs 4 devices, but 8 were found"):
    sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
  with pytest.raises(ConfigError, match="only one of"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_logical_names_map_to_partition_specs():
  spec = sharding.logical_to_mesh_spec(("embed", "mlp", None, "unknown"), sharding.DEFAULT_RULES)
  assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None, None)
  x = np.ones((2, 3))
  assert sharding.constrain(x, ("activation_batch", "activation_embed")) is x   # no mesh: as is


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "h:1", "num_processes": 4, "process_id": 2}),
    ({"SLURM_NTASKS": "16"}, {}),
    ({"SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, {}),
])
def test_distributed_initialize_from_env(monkeypatch, env, expected):
  """Explicit settings are passed on; SLURM (> 1 task) and Cloud TPU pods auto-detect."""
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  distributed.initialize()
  assert calls == ([] if expected is None else [expected])


def test_dcn_granules_are_slices_or_blocks_of_processes():
  """dcn_data splits `data` over TPU slices, or over hosts when every GPU has its own process
  (SLURM numbers processes host by host); anything else is refused with what was found."""
  from types import SimpleNamespace as Device
  gpus = [Device(id=i, process_index=i, slice_index=0) for i in range(16)]   # 2 hosts x 8
  granules = sharding._dcn_granules  # noqa: SLF001
  assert [[d.process_index for d in g] for g in granules(gpus, 2)] == [list(range(8)),
                                                                      list(range(8, 16))]
  tpus = [Device(id=i, process_index=i // 4, slice_index=i // 8) for i in range(16)]
  assert [{d.slice_index for d in g} for g in granules(tpus, 2)] == [{0}, {1}]
  with pytest.raises(ConfigError, match=r"16 devices are in 1 slice\(s\) and 16 process\(es\)"):
    granules(gpus, 3)
