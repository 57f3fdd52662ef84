"""compile_check.py (polycom_jax/compile_check.py): compiling for real TPU topologies on this CPU machine.

libtpu is a tool/test extra, never installed into the main venv (it must not change the CPU
behaviour of the other tests): these tests run the tool in a subprocess with the interpreter of
a separate venv, $POLYCOM_TPU_PYTHON (default .venv-tpu/bin/python, which `make test` creates
from requirements-tpu.txt), and skip when it does not exist. The no-libtpu test uses this
interpreter (the main venv).
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from polycom_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.environ.get("POLYCOM_TPU_PYTHON", os.path.join(ROOT, ".venv-tpu", "bin", "python"))
needs_libtpu = pytest.mark.skipif(
    not os.path.exists(TPU_PYTHON),
    reason=f"no libtpu venv at {TPU_PYTHON} (make test creates .venv-tpu from "
           "requirements-tpu.txt; or set POLYCOM_TPU_PYTHON)")


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("XLA_FLAGS", None)
  return env


def run_tool(*args, python=TPU_PYTHON, json_out=None, config="configs/tiny.py"):
  cmd = [python, "compile_check.py", f"--config={config}", *args]
  if json_out:
    cmd.append(f"--json_out={json_out}")
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def tiny_param_bytes(fsdp: int, **model_overrides) -> int:
  """Per-chip parameter bytes, computed independently of jax's sharding machinery: each
  parameter's dims named `embed` (the FSDP rule) are split fsdp ways, float32."""
  model = tiny.get_config().model
  model.update(model_overrides)
  mc = model_lib.ModelConfig.from_config(model)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(mc, nnx.Rngs(0)))
  total = 0
  for _, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape = list(var.get_value().shape)
    names = var.get_metadata().get("out_sharding") or ()
    for i, name in enumerate(names):
      if name == "embed":
        assert shape[i] % fsdp == 0
        shape[i] //= fsdp
    total += math.prod(shape) * 4
  return total


@needs_libtpu
def test_tiny_compiles_for_v5p_with_fsdp(tmp_path):
  out = tmp_path / "r.json"
  """Rows of 128 tokens: attention auto resolves to splash, compiled by Mosaic with the
  fused PolyNorm (the report names the backend)."""
  proc = run_tool("--topology=v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                  "--config.data.seq_len=128", "--config.model.max_seq_len=128", json_out=out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["num_chips"] == 4 and r["device_kind"] == "TPU v5" and r["mesh"]["fsdp"] == 4
  assert r["attention_impl"] == "splash" and "attention splash" in proc.stdout
  assert r["fits"] and set(r["steps"]) == {"train", "eval"}
  assert r["param_bytes"] == tiny_param_bytes(fsdp=4)
  assert r["param_bytes"] < model_lib.num_params(
      model_lib.ModelConfig.from_config(tiny.get_config().model)) * 4
  assert r["opt_state_bytes"] >= 2 * r["param_bytes"]          # Adam's mu and nu
  train = r["steps"]["train"]
  assert train["flops"] > 0 and train["temp"] > 0 and train["compile_s"] > 0
  # PolyNorm forward + backward, splash forward + backward (2 blocks): all through Mosaic.
  assert train["mosaic_kernels"] >= 4, train["mosaic_kernels"]
  for label in ("parameters", "optimizer state", "activations / temp", "XLA FLOPs",
                "model FLOPs", "compile time", "| fits | yes"):
    assert label in proc.stdout


@needs_libtpu
def test_tiny_compiles_for_v5e_replicated(tmp_path):
  out = tmp_path / "r.json"
  proc = run_tool("--topology=v5e:2x2", "--skip_eval", json_out=out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["num_chips"] == 4 and r["device_kind"] == "TPU v5 lite"
  assert r["hbm_bytes"] == 16 * 2**30 and r["fits"]
  # Pure data parallel (tiny's mesh): every chip holds all the parameters.
  mc = model_lib.ModelConfig.from_config(tiny.get_config().model)
  assert r["param_bytes"] == model_lib.num_params(mc) * 4 == tiny_param_bytes(fsdp=1)
  assert set(r["steps"]) == {"train"}
  assert r["attention_impl"] == "xla"          # tiny's 32-token rows: splash needs 128s


@needs_libtpu
def test_does_not_fit_exits_1(tmp_path):
  # ~4.3 GB of float32 embedding (+ Adam state x3) replicated per chip > 16 GiB of v5e HBM.
  proc = run_tool("--topology=v5e:2x2", "--skip_eval", "--config.model.vocab_size=1048576",
                  "--config.model.d_model=1024", "--config.model.num_heads=8",
                  "--config.model.ungated_d_ff=128")
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "does not fit" in proc.stderr


@needs_libtpu
def test_mesh_device_count_mismatch_names_both():
  proc = run_tool("--topology=v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=3")
  assert proc.returncode == 2
  assert "4 chips" in proc.stderr and "fsdp=3" in proc.stderr and "needs 3" in proc.stderr


@needs_libtpu
def test_bad_topology_name():
  proc = run_tool("--topology=v5p:banana")
  assert proc.returncode == 2 and "v5p:banana" in proc.stderr


@needs_libtpu
def test_scanned_layers_compile_and_report_full_depth_flops(tmp_path):
  """A scanned 4-layer model: parameters stacked along `layers` (replicated) and split over
  `embed`; the reported FLOPs (extrapolated from unrolled 1- and 2-layer compiles) equal those
  of the unrolled 4-layer compile; the fused kernel is compiled by Mosaic inside the loop."""
  common = ("--topology=v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
            "--config.model.num_layers=4")
  results, stdout = {}, {}
  for scan in (True, False):
    out = tmp_path / f"scan_{scan}.json"
    proc = run_tool(*common, f"--config.model.scan_layers={scan}", json_out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[scan], stdout[scan] = json.loads(out.read_text()), proc.stdout
  scanned, unrolled = results[True], results[False]
  assert scanned["scan_layers"] and scanned["num_layers"] == 4
  assert "extrapolation" in stdout[True] and "extrapolation" not in stdout[False]
  assert scanned["param_bytes"] == unrolled["param_bytes"] == tiny_param_bytes(
      fsdp=4, num_layers=4, scan_layers=True)
  for step in ("train", "eval"):
    a, b = scanned["steps"][step], unrolled["steps"][step]
    np.testing.assert_allclose(a["flops"], b["flops"], rtol=0.02, err_msg=step)
    assert a["mosaic_kernels"] > 0, step
  # One block compiled instead of four: less code.
  assert scanned["steps"]["train"]["code"] < unrolled["steps"]["train"]["code"]


@needs_libtpu
def test_gradient_accumulation_reports_the_whole_step_flops(tmp_path):
  """XLA counts the accumulation loop's body once; the tool scales it back: two micro-batches
  of 4 report the FLOPs of one batch of 8 (within 5%: XLA fuses the two programs differently;
  unscaled, they would be half)."""
  results = {}
  for micro in (0, 4):
    out = tmp_path / f"micro_{micro}.json"
    proc = run_tool("--topology=v5e:2x2", "--skip_eval", "--config.train.global_batch_size=8",
                    f"--config.train.micro_batch_size={micro}", "--config.data.seq_len=512",
                    "--config.model.max_seq_len=512", json_out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[micro] = json.loads(out.read_text())["steps"]["train"]
  np.testing.assert_allclose(results[4]["flops"], results[0]["flops"], rtol=0.05)


@needs_libtpu
def test_offloaded_remat_and_mlp_chunks_keep_the_flops_and_move_the_block_inputs(tmp_path):
  """remat=offload puts the block inputs in host memory: exactly layers x sequences per chip x
  seq x d_model bf16 values, reported apart from the HBM total; with mlp_chunk (a quarter of
  the sequence at a time) too, the FLOPs stay those of the plain step (the MLP's and the
  loss's chunk loops are counted whole, within 5%). At this size the bookkeeping outweighs
  what they save; the device memory they save at paper scale is measured in
  benchmarks/RESULTS.md ("Memory per sequence")."""
  layers, chips, batch, seq, d_model = 2, 4, 8, 256, 128
  shape = (f"--config.model.num_layers={layers}", f"--config.model.d_model={d_model}",
           "--config.model.ungated_d_ff=512", f"--config.data.seq_len={seq}",
           f"--config.model.max_seq_len={seq}", f"--config.train.global_batch_size={batch}",
           "--config.train.loss_chunk=64", "--config.model.scan_layers=True")
  results = {}
  for name, extra in (("full", ("--config.model.remat=full",)),
                      ("lean", ("--config.model.remat=offload", "--config.model.mlp_chunk=64"))):
    out = tmp_path / f"{name}.json"
    proc = run_tool("--topology=v5e:2x2", "--skip_eval", *shape, *extra, json_out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[name] = json.loads(out.read_text())["steps"]["train"]
  full, lean = results["full"], results["lean"]
  assert full["host_temp"] == 0
  assert lean["host_temp"] == layers * (batch // chips) * seq * d_model * 2
  np.testing.assert_allclose(lean["flops"], full["flops"], rtol=0.05)


@needs_libtpu
def test_max_batch_finds_the_boundary(tmp_path):
  """--max_batch: the batch it reports compiled and fit, the next multiple of the data-parallel
  size compiled and did not (the search's own log, from real compiles for a 16 GiB v5e)."""
  out = tmp_path / "r.json"
  # Long sequences and a large vocabulary, the logits held whole and XLA attention: ~1 GiB
  # of logits and scores per sequence, so few fit (and the search stays short).
  proc = run_tool("--topology=v5e:2x2", "--skip_eval", "--max_batch",
                  "--config.data.seq_len=8192", "--config.model.max_seq_len=8192",
                  "--config.train.loss_chunk=0", "--config.model.attention_impl=xla",
                  "--config.model.vocab_size=32768", "--config.train.global_batch_size=16",
                  json_out=out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  best = json.loads(out.read_text())["max_global_batch"]
  verdicts = dict(re.findall(r"global batch (\d+): .* -> (fits|does not fit)", proc.stdout))
  assert best > 0 and best % 4 == 0
  assert verdicts[str(best)] == "fits", proc.stdout
  assert verdicts[str(best + 4)] == "does not fit", proc.stdout
  assert f"largest global batch that fits: {best}" in proc.stdout


COMPILE_ERROR_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import pallas as pl
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from polycom_jax import compile_check
    devices = compile_check.get_topology_devices("v5e:2x2")
    for name in ("v4:2x2x1", "v5p:2x2x1", "v5e:2x2", "v6e:2x2"):
      kind = compile_check.get_topology_devices(name)[0].device_kind
      print("kind", name, kind, compile_check.HBM_BYTES.get(kind))
    rep = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), P())
    def copy(x_ref, o_ref):
      o_ref[...] = x_ref[...]
    # A (3, 5) block of a (6, 10) array: not a multiple of the (8, 128) TPU tile, so Mosaic fails.
    bad = pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((6, 10), jnp.float32),
                         grid=(2, 2), in_specs=[pl.BlockSpec((3, 5), lambda i, j: (i, j))],
                         out_specs=pl.BlockSpec((3, 5), lambda i, j: (i, j)))
    try:
      compile_check.compile_step("probe", jax.jit(bad),
                                 jax.ShapeDtypeStruct((6, 10), jnp.float32, sharding=rep))
    except compile_check.CompileError as e:
      print("CompileError:", e)
""")


@needs_libtpu
def test_every_slice_kind_has_its_hbm_and_compile_errors_are_named():
  proc = subprocess.run([TPU_PYTHON, "-c", COMPILE_ERROR_SCRIPT], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  kinds = [l.split() for l in proc.stdout.splitlines() if l.startswith("kind ")]
  assert len(kinds) == 4 and all(k[-1] != "None" for k in kinds), kinds
  error = [l for l in proc.stdout.splitlines() if l.startswith("CompileError:")]
  assert error and "the probe step does not compile" in error[0], proc.stdout[-2000:]


@needs_libtpu
def test_expert_parallel_moe_compiles_with_megablox_and_all_to_alls(tmp_path):
  """The tiny MoE, moe_impl=dispatch on v5p:2x2x1 (fsdp 2 x expert 2): the step holds
  all-to-alls and the megablox kernels (gmm forward and input gradient, tgmm weight gradient;
  "auto" resolves to megablox for the TPU); the gather path moves no all-to-all bytes."""
  common = ("--topology=v5p:2x2x1", "--skip_eval", "--config.train.global_batch_size=8",
            "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.expert=2")
  steps = {}
  for impl in ("dispatch", "ragged"):
    out = tmp_path / f"{impl}.json"
    proc = run_tool(*common, f"--config.model.moe_impl={impl}", json_out=out,
                    config="configs/tiny_moe.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps[impl] = json.loads(out.read_text())["steps"]["train"]
  assert steps["dispatch"]["collectives"]["all-to-all"] > 0
  assert steps["ragged"]["collectives"]["all-to-all"] == 0
  for impl in steps:
    kernels = steps[impl]["kernels"]
    assert kernels.get("gmm", 0) >= 2 and kernels.get("tgmm", 0) >= 1, (impl, kernels)


KERNEL_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from polycom_jax import kernels
    topo = topologies.get_topology_desc(platform="tpu", topology_name=sys.argv[1])
    rep = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), P())
    x = jax.ShapeDtypeStruct((256, 1024), jnp.bfloat16, sharding=rep)
    w = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=rep)
    b = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=rep)
    fns = {"norm": lambda x, w, b: kernels.poly_norm(x, w, b, 1e-6, impl="pallas"),
           "relu": lambda x, w, b: kernels.poly_relu(x, w, b, impl="pallas")}
    for name, f in fns.items():
      g = jax.grad(lambda x, w, b: jnp.sum(f(x, w, b).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
      for kind, fn in (("fwd", f), ("bwd", g)):
        c = jax.jit(fn).lower(x, w, b).compile()
        n = c.as_text().count('custom_call_target="tpu_custom_call"')
        print(name, kind, n, topo.devices[0].device_kind, flush=True)
""")


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5e:2x2"])
def test_fused_kernels_compile_with_mosaic(topology):
  proc = subprocess.run([TPU_PYTHON, "-c", KERNEL_SCRIPT, topology], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l.split() for l in proc.stdout.splitlines() if l.split()[:1] in (["norm"], ["relu"])]
  assert {(l[0], l[1]) for l in lines} == {("norm", "fwd"), ("norm", "bwd"), ("relu", "fwd"),
                                           ("relu", "bwd")}
  for l in lines:
    assert int(l[2]) >= 1, l        # a Mosaic kernel in each compiled function


def test_without_libtpu_says_how_to_install():
  try:
    import libtpu  # noqa: F401
    pytest.skip("libtpu is importable in this interpreter")
  except ImportError:
    pass
  proc = run_tool("--topology=v5p:2x2x1", python=sys.executable)
  assert proc.returncode == 2
  assert f'pip install "jax[tpu]=={jax.__version__}"' in proc.stderr


def test_hlo_stats_reads_collective_bytes_and_kernel_calls():
  """Result bytes per collective kind (a tuple result summed; an async -start counted once, by
  its largest array, since its tuple holds the operand too) and Pallas calls by name."""
  from polycom_jax import hlo_stats  # pylint: disable=g-import-not-at-top
  hlo = textwrap.dedent("""\
      %all_to_all.84 = bf16[2,320,128]{2,1,0:T(8,128)(2,1)} all-to-all(%bitcast.531), channel_id=1
      %all-reduce.3 = (f32[8]{0:T(128)}, f32[]{:T(128)}) all-reduce(%a, %b), channel_id=2
      %all-gather-start = (bf16[4,64]{1,0}, bf16[16,64]{1,0}) all-gather-start(%p), dimensions={0}
      %all-gather-done = bf16[16,64]{1,0} all-gather-done(%all-gather-start)
      ROOT %gmm.3 = bf16[640,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call"
      %gmm = bf16[640,128]{1,0} custom-call(%y), custom_call_target="tpu_custom_call"
      %splash_mha_fwd.2 = f32[2,4]{1,0} custom-call(%z), custom_call_target="tpu_custom_call"
      %other = f32[2]{0} custom-call(%z), custom_call_target="Sharding"
      """)
  assert hlo_stats.collective_bytes(hlo) == {
      "all-gather": 16 * 64 * 2, "all-reduce": 8 * 4 + 4, "reduce-scatter": 0,
      "all-to-all": 2 * 320 * 128 * 2, "ragged-all-to-all": 0, "collective-permute": 0}
  assert hlo_stats.mosaic_kernels(hlo) == {"gmm": 2, "splash_mha_fwd": 1}
