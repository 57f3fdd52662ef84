"""The subprocess side of tests/test_moe_dispatch.py, on 8 fake CPU devices (the test sets
XLA_FLAGS before jax starts):

  python tests/moe_dispatch_worker.py OUT_DIR

For each router (random, all-tie, every token on experts 0 and 1) it runs one MoE layer's
forward and backward on one device ("ragged", the reference) and expert-parallel ("dispatch")
under the meshes below, and writes outputs, router losses, dropped fractions and every gradient
to OUT_DIR/arrays.npz as "<case>/<name>".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import tiny_moe  # noqa: E402
from polycom_jax import model as model_lib  # noqa: E402
from polycom_jax import moe, sharding  # noqa: E402

E, K, D, F = 8, 2, 16, 24
B, T = 8, 6                      # 6 tokens, 12 assignments per device on 8 devices
ROUTERS = ("random", "ties", "one_device")
# case -> (mesh, capacity_factor, extra model fields); capacity_factor = the expert axis size
# never drops, so those cases must equal one device.
CASES = {
    "expert4_data2": ({"data": 2, "expert": 4}, 4.0, {}),
    "expert8": ({"expert": 8}, 8.0, {}),
    "expert4_data2_per_expert_megablox": ({"data": 2, "expert": 4}, 4.0,
                                          {"activation_per_expert": True,
                                           "moe_matmul": "megablox"}),
    "expert8_capacity1": ({"expert": 8}, 1.0, {}),
}


def layer_config(impl: str, factor: float, **extra) -> model_lib.ModelConfig:
  c = tiny_moe.get_config()
  c.model.update(d_model=D, num_heads=2, num_kv_heads=2, num_experts=E, num_experts_per_tok=K,
                 moe_d_ff=F, activation="polynorm", init_std=0.3, moe_impl=impl,
                 moe_capacity_factor=factor, **extra)
  return model_lib.ModelConfig.from_config(c.model)


def make_layer(c, router: str) -> moe.MoE:
  layer = moe.MoE(c, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  weight, bias = (layer.act_weight, layer.act_bias) if c.activation_per_expert else (
      layer.act.weight, layer.act.bias)
  weight[...] = jnp.asarray(rng.uniform(0.2, 1.0, weight[...].shape), jnp.float32)
  bias[...] = jnp.asarray(rng.standard_normal(bias[...].shape), jnp.float32)
  if router == "ties":
    layer.router[...] = jnp.zeros((D, E))
  elif router == "one_device":        # experts 0 and 1 win for every (positive) token
    r = np.zeros((D, E), np.float32)
    r[:, 0], r[:, 1] = 5.0, 4.0
    layer.router[...] = jnp.asarray(r)
  return layer


def inputs(router: str) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  if router != "random":
    x = jnp.abs(x)
  return x, jax.random.normal(jax.random.key(2), (B, T, D))


def forward_backward(c, router: str, mesh_axes: dict | None) -> dict[str, np.ndarray]:
  graphdef, state = nnx.split(make_layer(c, router))
  x, cotangent = inputs(router)

  def loss(state, x):
    layer = nnx.merge(graphdef, state)
    y = layer(x)
    losses = {"load_balance": layer.load_balance[...], "router_z": layer.router_z[...]}
    if c.moe_impl == "dispatch":
      losses["dropped"] = layer.dropped[...]
    return jnp.sum(y * cotangent) + losses["load_balance"] + losses["router_z"], (y, losses)

  run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh_axes is None:
    (_, (y, losses)), (g_state, g_x) = run(state, x)
  else:
    mesh = sharding.make_mesh(mesh_axes, jax.devices())
    rules = sharding.DEFAULT_RULES
    with jax.set_mesh(mesh), sharding.activation_sharding(mesh, rules):
      x = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
      (_, (y, losses)), (g_state, g_x) = run(state, x)
  out = {"y": y, "grad/x": g_x, **{f"loss/{k}": v for k, v in losses.items()}}
  for path, v in nnx.to_flat_state(g_state):
    if isinstance(v, nnx.Param):
      out["grad/" + "/".join(map(str, path))] = v[...]
  return {k: np.asarray(v) for k, v in out.items()}


def main(out_dir: str):
  assert len(jax.devices()) == 8, jax.devices()
  arrays = {}
  for router in ROUTERS:
    for per_expert in (False, True):
      ref = forward_backward(layer_config("ragged", 1.0, activation_per_expert=per_expert),
                             router, None)
      arrays.update({f"{router}/single{'_per_expert' * per_expert}/{k}": v
                     for k, v in ref.items()})
    for case, (mesh_axes, factor, extra) in CASES.items():
      got = forward_backward(layer_config("dispatch", factor, **extra), router, mesh_axes)
      arrays.update({f"{router}/{case}/{k}": v for k, v in got.items()})
  np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
