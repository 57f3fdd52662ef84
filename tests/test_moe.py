"""The MoE layer against a float64 per-token loop, its auxiliary losses, and training."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_moe
from polycom_jax import model as model_lib
from polycom_jax import loop, moe
from polycom_jax.config_errors import ConfigError
from conftest import jaxpr_eqns
from test_activations import np_poly_norm, np_poly_relu

E, K, D, F = 6, 2, 16, 24


def _config(**overrides) -> model_lib.ModelConfig:
  c = tiny_moe.get_config()
  c.model.update(d_model=D, num_heads=2, num_kv_heads=2, num_experts=E, num_experts_per_tok=K,
                 moe_d_ff=F, activation="polynorm", init_std=0.3)
  c.model.update(overrides)
  return model_lib.ModelConfig.from_config(c.model)


def _layer(c, seed=0) -> moe.MoE:
  layer = moe.MoE(c, nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  if c.activation_per_expert:   # distinct coefficients per expert, so mixing them up shows
    layer.act_weight[...] = jnp.asarray(rng.uniform(0.2, 1.0, layer.act_weight[...].shape),
                                        jnp.float32)
    layer.act_bias[...] = jnp.asarray(rng.standard_normal(layer.act_bias[...].shape),
                                      jnp.float32)
  elif hasattr(layer, "act") and hasattr(layer.act, "weight"):
    layer.act.weight[...] = jnp.asarray(rng.uniform(0.2, 1.0, c.activation_order), jnp.float32)
    layer.act.bias[...] = jnp.asarray(rng.standard_normal(1), jnp.float32)
  return layer


def np_moe(layer: moe.MoE, c, x, capacity=None, keep=None):
  """Float64 loop: for every token, its top-k experts' MLPs weighted by router probability.
  With `capacity`, an expert takes only its first `capacity` assignments in token order; with
  `keep(token, expert)`, only the assignments it accepts."""
  p = {k: np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))
       for k in ["/".join(map(str, k))]}
  xs = np.asarray(x, np.float64).reshape(-1, D)
  logits = xs @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.zeros_like(xs)
  taken = np.zeros(E, int)
  for n in range(xs.shape[0]):
    chosen = np.argsort(-probs[n], kind="stable")[:K]                # ties: lowest index first
    w = probs[n, chosen]
    if c.moe_renormalize:
      w = w / w.sum()
    for e, we in zip(chosen, w):
      taken[e] += 1
      if capacity is not None and taken[e] > capacity or keep is not None and not keep(n, e):
        continue
      h = xs[n] @ p["w_up"][e]
      if c.activation_per_expert:
        cw, cb = p["act_weight"][e], p["act_bias"][e]
      elif "act/weight" in p:
        cw, cb = p["act/weight"], p["act/bias"]
      if c.activation == "polynorm":
        h = np_poly_norm(h[None], cw, cb)[0]
      elif c.activation == "polyrelu":
        h = np_poly_relu(h, cw, cb)
      else:  # swiglu
        g = xs[n] @ p["w_gate"][e]
        h = g / (1 + np.exp(-g)) * h
      y[n] += we * (h @ p["w_down"][e])
  return y.reshape(x.shape)


@pytest.mark.parametrize("overrides", [
    {"moe_impl": "ragged"},
    {"moe_impl": "capacity", "moe_capacity_factor": float(E)},       # large enough: no drops
    {"moe_impl": "ragged", "activation": "swiglu", "moe_renormalize": True},
    {"moe_impl": "ragged", "activation": "polyrelu", "activation_per_expert": True},
    {"moe_impl": "capacity", "activation_per_expert": True, "moe_capacity_factor": float(E)},
    {"moe_impl": "dispatch"},                                  # one device: nothing to drop
    {"moe_impl": "dispatch", "activation_per_expert": True, "moe_matmul": "megablox"},
    {"moe_impl": "ragged", "activation": "swiglu", "moe_matmul": "megablox"},
])
def test_routed_layer_equals_per_token_loop(overrides):
  c = _config(**overrides)
  layer = _layer(c)
  x = jax.random.normal(jax.random.key(1), (3, 7, D))
  np.testing.assert_allclose(layer(x), np_moe(layer, c, x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["ragged", "capacity", "dispatch"])
def test_ties_and_every_token_on_the_same_experts(impl):
  """Router columns 0 and 1 dominate for every token (all tokens pick experts {0, 1}) and
  columns 2..5 are equal (ties broken by the lower index, as in the reference)."""
  c = _config(moe_impl=impl, moe_capacity_factor=float(E))
  layer = _layer(c)
  router = np.zeros((D, E), np.float32)
  router[:, 0], router[:, 1] = 5.0, 4.0
  layer.router[...] = jnp.asarray(router)
  x = jnp.abs(jax.random.normal(jax.random.key(2), (2, 5, D)))      # positive: logits ordered
  np.testing.assert_allclose(layer(x), np_moe(layer, c, x), rtol=2e-5, atol=2e-5)
  layer.router[...] = jnp.zeros((D, E))                              # all experts tie
  np.testing.assert_allclose(layer(x), np_moe(layer, c, x), rtol=2e-5, atol=2e-5)


def test_capacity_drops_late_assignments():
  c = _config(moe_impl="capacity", moe_capacity_factor=0.5)
  layer = _layer(c)
  x = jax.random.normal(jax.random.key(3), (2, 6, D))
  capacity = int(np.ceil(0.5 * 12 * K / E))
  np.testing.assert_allclose(layer(x), np_moe(layer, c, x, capacity), rtol=2e-5, atol=2e-5)


def test_dispatch_buffer_drops_the_last_assignments_in_expert_order_and_counts_them():
  """One device, capacity_factor 0.5: the buffer holds the first half of the N*k assignments
  sorted by expert (token order within an expert); the rest skip their experts, and the
  layer's `dropped` is their fraction."""
  c = _config(moe_impl="dispatch", moe_capacity_factor=0.5)
  layer = _layer(c)
  x = jax.random.normal(jax.random.key(3), (2, 6, D))
  logits = np.asarray(x.reshape(-1, D) @ layer.router[...], np.float64)
  chosen = np.argsort(-logits, axis=1, kind="stable")[:, :K]          # [N, K]
  ranked = sorted((e, n) for n in range(chosen.shape[0]) for e in chosen[n])
  kept = set(ranked[:int(np.ceil(0.5 * len(ranked)))])
  expected = np_moe(layer, c, x, keep=lambda n, e: (e, n) in kept)
  np.testing.assert_allclose(layer(x), expected, rtol=2e-5, atol=2e-5)
  assert float(layer.dropped[...]) == pytest.approx(1 - len(kept) / len(ranked))


@pytest.mark.parametrize("impl", ["ragged", "capacity", "dispatch"])
def test_no_path_combines_its_outputs_by_a_scatter_add_of_rows(impl):
  """Each path combines the k outputs of a token by a gather and a contraction: a scatter-add
  of float32 [N * k, D] rows would hold the largest buffer of the layer."""
  layer = _layer(_config(moe_impl=impl, moe_capacity_factor=1.0))
  graph, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(3), (2, 6, D))
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x))(state, x)
  row_scatter_adds = [
      eqn for eqn in jaxpr_eqns(jaxpr.jaxpr) if eqn.primitive.name == "scatter-add"
      and eqn.outvars[0].aval.ndim == 2]      # per-expert counts are vectors, rows are not
  assert not row_scatter_adds


def test_auxiliary_losses_match_their_formulas():
  uniform = jnp.full((8, 4), 0.25)
  balanced = jnp.array([[0, 1], [2, 3]] * 4)                         # every expert 4 times
  assert moe.load_balancing_loss(uniform, balanced, 4) == pytest.approx(1.0)
  skewed_probs = jnp.tile(jnp.array([[0.7, 0.1, 0.1, 0.1]]), (8, 1))
  all_to_zero_one = jnp.tile(jnp.array([[0, 1]]), (8, 1))
  # f = (1/2, 1/2, 0, 0), P = (0.7, 0.1, 0.1, 0.1): 4 * (0.35 + 0.05) = 1.6
  assert moe.load_balancing_loss(skewed_probs, all_to_zero_one, 4) == pytest.approx(1.6)
  assert moe.load_balancing_loss(skewed_probs, all_to_zero_one, 4) > moe.load_balancing_loss(
      uniform, balanced, 4)
  logits = jnp.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
  lse = np.log(np.exp([0.0, 1.0, 2.0]).sum()), 1 + np.log(3)
  assert moe.router_z_loss(logits) == pytest.approx(np.mean(np.square(lse)), rel=1e-6)


@pytest.mark.parametrize("impl", ["ragged", "capacity", "dispatch"])
def test_layer_records_the_formulas_losses(impl):
  """The layer computes its losses from sums (which add up across shards); they equal the
  formulas on the whole batch."""
  c = _config(moe_impl=impl)
  layer = _layer(c)
  x = jax.random.normal(jax.random.key(5), (3, 7, D))
  layer(x)
  logits = x.reshape(-1, D) @ layer.router[...]
  _, experts, probs = moe.route(logits, K, c.moe_renormalize)
  np.testing.assert_allclose(layer.load_balance[...],
                             moe.load_balancing_loss(probs, experts, E), rtol=1e-6)
  np.testing.assert_allclose(layer.router_z[...], moe.router_z_loss(logits), rtol=1e-6)


def test_gradients_reach_router_experts_and_coefficients():
  c = _config(activation_per_expert=True)
  layer = _layer(c)
  x = jax.random.normal(jax.random.key(4), (4, 8, D))

  def loss(layer):
    y = layer(x)
    return jnp.sum(y ** 2) + layer.load_balance[...] + layer.router_z[...]

  grads = nnx.grad(loss)(layer)
  for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)) and np.any(g != 0), path


def test_param_and_flop_counts():
  c = _config(activation_per_expert=True)
  m = model_lib.Transformer(c, nnx.Rngs(0))
  assert model_lib.num_params(c) == sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  dense_equivalent = _config(num_experts=0, d_ff=F)
  # Active FLOPs: k experts of width F plus the router, not all E experts.
  extra = model_lib.flops_per_token(c, 32) - model_lib.flops_per_token(dense_equivalent, 32)
  assert extra == 6 * c.num_layers * ((K - 1) * 2 * D * F + D * E)


def test_invalid_moe_configs():
  with pytest.raises(ConfigError, match="num_experts_per_tok"):
    _config(num_experts_per_tok=E + 1)
  with pytest.raises(ConfigError, match="moe_impl"):
    _config(moe_impl="megablocks")
  with pytest.raises(ConfigError, match="moe_matmul"):
    _config(moe_matmul="gmm")


def test_tiny_moe_trains_and_logs_router_losses(tiny, tmp_path):
  """With scan_layers (as configs/paper_moe.py): the router losses come out of the scan, and
  the coefficients log has one row per layer."""
  config = tiny(num_steps=30, log_every=10, checkpoint_every=0, warmup_steps=3)
  config.model.update(num_experts=4, num_experts_per_tok=2, moe_ungated_d_ff=96,
                      scan_layers=True)
  loop.train(config, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert records[-1]["loss"] < records[0]["loss"] - 0.5
  assert all(0 < r["moe_load_balance"] < 4 for r in records)      # 1 when balanced, E at worst
  assert all(r["moe_router_z"] > 0 for r in records)
  with open(os.path.join(tmp_path, "coefficients.jsonl")) as f:
    coefficients = [json.loads(line)["layers"] for line in f]
  order = config.model.get("activation_order", 3)
  assert np.array(coefficients[-1]).shape == (config.model.num_layers, order + 1)
