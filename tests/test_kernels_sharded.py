"""poly_norm_sharded / poly_relu_sharded on a (data 2, tensor 4) mesh of 8 fake CPU devices equal
the unsharded reference (jnp autodiff of activations.*_reference on one device), forward and grads;
and the one dispatch point (activations.poly_norm / poly_relu) picks the path the mesh allows.

The checks run in a subprocess (XLA_FLAGS set before jax starts) so the fake devices do not slow
the rest of the suite. Tolerance: float32, 2e-5 of each output's scale.
"""

import os
import subprocess
import sys

import numpy as np

from conftest import xla_flags

EPS = 1e-6


def _inputs(shape, order, seed):
  """Random rows; one row also has a tensor shard of zeros and one a shard 1e4 times larger, so
  the pmax/psum combine sees shards of very different scale (and an all-zero shard)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  quarter = shape[-1] // 4
  x[(0,) * (len(shape) - 1)][:quarter] = 0.0
  x[(1,) * (len(shape) - 1)][quarter:2 * quarter] *= 1e4
  w = (rng.uniform(0.2, 1.0, order) * rng.choice([-1, 1], order)).astype(np.float32)
  b = rng.standard_normal(1).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  return x, w, b, g


def _check_all():
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from polycom_jax import activations, kernels

  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))

  def value_and_grads(fn, x, w, b, g):
    y, vjp = jax.vjp(fn, x, w, b)
    return (y, *vjp(g))

  reference = {
      "norm": lambda x, w, b: activations.poly_norm_reference(x, w, b, EPS),
      "relu": activations.poly_relu_reference,
  }
  sharded = {
      "norm": lambda impl, spec: lambda x, w, b: kernels.poly_norm_sharded(
          x, w, b, EPS, impl=impl, mesh=mesh, x_spec=spec),
      "relu": lambda impl, spec: lambda x, w, b: kernels.poly_relu_sharded(
          x, w, b, impl=impl, mesh=mesh, x_spec=spec),
  }
  cases = [  # kernel, impl, x shape, x_spec
      ("norm", "xla", (6, 132), P("data", "tensor")),
      ("norm", "xla", (2, 3, 516), P("data", None, "tensor")),
      ("norm", "xla", (6, 132), P("data", None)),
      ("norm", "pallas", (6, 132), P("data", "tensor")),
      ("norm", "pallas", (2, 3, 516), P("data", None, "tensor")),
      ("norm", "pallas", (6, 132), P("data", None)),
      ("relu", "xla", (6, 132), P("data", "tensor")),
      ("relu", "pallas", (6, 132), P("data", "tensor")),
  ]
  for i, (kernel, impl, shape, spec) in enumerate(cases):
    x, w, b, g = _inputs(shape, 3, seed=i)
    expected = jax.jit(value_and_grads, static_argnums=0)(reference[kernel], x, w, b, g)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    gs = jax.device_put(g, NamedSharding(mesh, spec))
    step = jax.jit(value_and_grads, static_argnums=0)
    got = step(sharded[kernel](impl, spec), xs, w, b, gs)
    assert got[0].sharding.spec == spec, got[0].sharding
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, expected):
      a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
      assert a.shape == e.shape and np.all(np.isfinite(a)), (kernel, impl, name)
      err = np.max(np.abs(a - e)) / (np.max(np.abs(e)) + 1e-30)
      assert err < 2e-5, (kernel, impl, shape, spec, name, err)
    print("ok", kernel, impl, shape, spec)


def _check_dispatch():
  """activations.poly_norm / poly_relu with impl="pallas": the kernel as is without a mesh and in a
  per_shard body; per shard in shard_map under a multi-device mesh when x's logical axes are
  given (equal to the reference, values and grads); the jnp path under a mesh without them."""
  import jax
  from jax.sharding import AxisType, Mesh

  from polycom_jax import activations, layers, sharding

  mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 4, 1), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * 4)
  rules = sharding.DEFAULT_RULES          # HIDDEN: rows over data, the last axis over tensor
  x, w, b, g = _inputs((4, 3, 132), 3, seed=11)

  def per_shard(fn):
    def wrapped(*args):
      with sharding.per_shard():
        return fn(*args)
    return wrapped

  def value_and_grads(fn, x, w, b, g):
    y, vjp = jax.vjp(fn, x, w, b)
    return (y, *vjp(g))

  def program(fn, mesh_active: bool) -> str:
    traced = sharding.with_activation_sharding(fn, mesh, rules) if mesh_active else fn
    return str(jax.make_jaxpr(lambda *a: value_and_grads(traced, *a))(x, w, b, g))

  norm = lambda **kw: lambda x, w, b: activations.poly_norm(x, w, b, EPS, **kw)
  relu = lambda **kw: lambda x, w, b: activations.poly_relu(x, w, b, **kw)
  named = {"logical_axes": layers.HIDDEN}
  cases = [  # name, fn, mesh active, expect pallas_call, expect shard_map
      ("no mesh", norm(impl="pallas", **named), False, True, False),
      ("mesh, named", norm(impl="pallas", **named), True, True, True),
      ("mesh, named, polyrelu", relu(impl="pallas", **named), True, True, True),
      ("mesh, unnamed", norm(impl="pallas"), True, False, False),
      ("mesh, per_shard body", per_shard(norm(impl="pallas")), True, True, False),
      ("mesh, xla", norm(impl="xla", **named), True, False, False),
  ]
  for name, fn, active, want_pallas, want_shard_map in cases:
    text = program(fn, active)
    assert ("pallas_call" in text) == want_pallas, (name, "pallas_call")
    assert ("shard_map" in text) == want_shard_map, (name, "shard_map")
    print("ok dispatch", name)
  reference = {"norm": lambda x, w, b: activations.poly_norm_reference(x, w, b, EPS),
               "relu": activations.poly_relu_reference}
  for kind, fn in (("norm", norm(impl="pallas", **named)), ("relu", relu(impl="pallas", **named))):
    expected = value_and_grads(reference[kind], x, w, b, g)
    with jax.set_mesh(mesh):
      got = jax.jit(lambda *a: value_and_grads(
          sharding.with_activation_sharding(fn, mesh, rules), *a))(x, w, b, g)
    for label, a, e in zip(("y", "dx", "dweight", "dbias"), got, expected):
      a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
      err = np.max(np.abs(a - e)) / (np.max(np.abs(e)) + 1e-30)
      assert err < 2e-5, (kind, label, err)
    print("ok dispatch values", kind)


def test_sharded_kernels_and_the_dispatch_point():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.count("ok ") == 8 + 6 + 2, proc.stdout
  assert proc.stdout.count("ok dispatch") == 6 + 2, proc.stdout


if __name__ == "__main__":
  _check_all()
  _check_dispatch()
