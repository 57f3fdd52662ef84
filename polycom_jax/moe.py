"""Sparse mixture-of-experts MLP (OLMoE-style token-choice top-k) with PolyCom experts.

Each token's router picks k of E experts; each chosen expert runs the configured MLP on the
token (PolyNorm normalises over that expert's own hidden vector, per token and expert), and the
outputs are summed with the router weights. Two ways to compute it:
- "ragged" (dropless): sort the N*k (token, expert) assignments by expert and run grouped matmuls
  (`jax.lax.ragged_dot`) over the contiguous groups: no padding FLOPs, no dropped tokens.
- "capacity": each expert takes at most C = ceil(capacity_factor * N * k / E) assignments
  (later ones are dropped, in token order) into a dense [E, C, D] buffer and runs batched
  matmuls. Sharding that buffer's E axis over the `expert` mesh axis is expert parallelism:
  GSPMD moves tokens to their experts' devices with all-to-alls.
The layer records the Switch/OLMoE load-balancing loss and the router z-loss as
nnx.Intermediate values; `aux_losses(model)` collects them for the training loss.

By default the PolyCom coefficients (weight, bias) are ONE set per layer shared by all experts,
as in the paper's OLMoE code; `activation_per_expert=True` gives each expert its own.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from polycom_jax import activations
from polycom_jax.sharding import active_layout

MOE_IMPLS = ("ragged", "capacity")


class RouterStats(nnx.Intermediate):
  """Per-layer auxiliary losses of the router, read by aux_losses() after a forward pass."""


def route(logits: jax.Array, k: int, renormalize: bool):
  """Top-k token choice: (weights [N, k], experts [N, k], probs [N, E]) from logits [N, E]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts, probs


def load_balancing_loss(probs: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
  """Switch/OLMoE loss E * sum_e f_e * P_e: f_e the fraction of the N*k assignments that went
  to expert e, P_e the mean router probability of e. Equals 1 when routing is uniform."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
  fraction = counts / experts.size
  return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """mean(logsumexp(logits)**2): keeps router logits small (ST-MoE)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


class MoE(nnx.Module):
  """Token-choice top-k MoE MLP: x [B, T, D] -> [B, T, D]."""

  def __init__(self, c, rngs: nnx.Rngs):
    from polycom_jax.model import DTYPES, _param  # model imports this module lazily
    self.c = c
    self.spec = activations.get(c.activation)
    pd, std, e, d, f = DTYPES[c.param_dtype], c.init_std, c.num_experts, c.d_model, c.moe_d_ff
    self.router = _param(rngs, (d, e), ("embed", None), std, pd)
    self.w_up = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
    if self.spec.gated:
      self.w_gate = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
    self.w_down = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, pd)
    if self.spec.has_params and c.activation_per_expert:
      r = c.activation_order
      self.act_weight = nnx.Param(jnp.full((e, r), 1.0 / r, jnp.float32),
                                  out_sharding=("expert", None), eager_sharding=False)
      self.act_bias = nnx.Param(jnp.zeros((e, 1), jnp.float32),
                                out_sharding=("expert", None), eager_sharding=False)
    else:
      self.act = self.spec.make(order=c.activation_order, impl=c.activation_impl)

  def _polycom(self, h: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """PolyNorm / PolyReLU with these coefficients. XLA cannot partition a Pallas call and the
    expert rows have no fixed layout to shard_map over, so under a multi-device mesh the
    custom-VJP jnp path (which GSPMD partitions) replaces the fused kernel here."""
    impl = activations.resolve_impl(self.c.activation_impl)
    if impl == "pallas" and active_layout(("activation_batch",)) is not None:
      impl = "xla"
    if self.spec.name == "polynorm":
      return activations.poly_norm(h, weight, bias, impl=impl)
    return activations.poly_relu(h, weight, bias, impl=impl)

  def _activate(self, h: jax.Array, expert_of_row: jax.Array) -> jax.Array:
    """The activation on hidden rows h [R, F]; per-expert coefficients picked by row."""
    if not self.spec.has_params:
      return self.act(h)
    if not self.c.activation_per_expert:
      return self._polycom(h, self.act.weight[...], self.act.bias[...])
    w = self.act_weight[...][expert_of_row]                             # [R, r]
    b = self.act_bias[...][expert_of_row]                               # [R, 1]
    # PolyCom is linear in its coefficients: sum_i w[i] * (the activation with weight e_i).
    r, zero = w.shape[-1], jnp.zeros((1,), jnp.float32)
    y = b.astype(h.dtype)
    for i in range(r):
      unit = jnp.zeros((r,), jnp.float32).at[i].set(1.0)
      y = y + w[:, i:i + 1].astype(h.dtype) * self._polycom(h, unit, zero)
    return y

  def _expert_mlp_ragged(self, xs: jax.Array, group_sizes: jax.Array, expert_of_row):
    dt = self.c.compute_dtype
    h = jax.lax.ragged_dot(xs, self.w_up[...].astype(dt), group_sizes)   # [R, F]
    if self.spec.gated:
      g = jax.lax.ragged_dot(xs, self.w_gate[...].astype(dt), group_sizes)
      h = self._activate(g, expert_of_row) * h
    else:
      h = self._activate(h, expert_of_row)
    return jax.lax.ragged_dot(h, self.w_down[...].astype(dt), group_sizes)  # [R, D]

  def _expert_mlp_dense(self, xe: jax.Array, expert_of_row) -> jax.Array:
    """Batched expert MLPs on the capacity buffer xe [E, C, D]."""
    dt = self.c.compute_dtype
    e, cap, _ = xe.shape
    h = jnp.einsum("ecd,edf->ecf", xe, self.w_up[...].astype(dt))
    if self.spec.gated:
      g = jnp.einsum("ecd,edf->ecf", xe, self.w_gate[...].astype(dt))
      h = self._activate(g.reshape(e * cap, -1), expert_of_row).reshape(h.shape) * h
    else:
      h = self._activate(h.reshape(e * cap, -1), expert_of_row).reshape(h.shape)
    return jnp.einsum("ecf,efd->ecd", h, self.w_down[...].astype(dt))

  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.c, self.c.compute_dtype
    b, t, d = x.shape
    e, k = c.num_experts, c.num_experts_per_tok
    xf = x.reshape(b * t, d)                                            # [N, D]
    logits = xf.astype(jnp.float32) @ self.router[...].astype(jnp.float32)   # [N, E]
    weights, experts, probs = route(logits, k, c.moe_renormalize)
    # Set on every call (not at construction) so the params-only state still merges.
    self.load_balance = RouterStats(load_balancing_loss(probs, experts, e))
    self.router_z = RouterStats(router_z_loss(logits))
    flat_expert = experts.reshape(-1)                                   # [N*k]
    flat_token = jnp.repeat(jnp.arange(b * t), k)                       # [N*k]
    flat_weight = weights.reshape(-1)
    if c.moe_impl == "ragged":
      order = jnp.argsort(flat_expert, stable=True)
      rows_expert = flat_expert[order]
      rows_token = flat_token[order]
      group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
      out = self._expert_mlp_ragged(xf[rows_token].astype(dt), group_sizes, rows_expert)
      out = out.astype(jnp.float32) * flat_weight[order][:, None]
      y = jnp.zeros((b * t, d), jnp.float32).at[rows_token].add(out)
    else:
      cap = max(1, math.ceil(c.moe_capacity_factor * b * t * k / e))
      one_hot = jax.nn.one_hot(flat_expert, e, dtype=jnp.int32)         # [N*k, E]
      position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # [N*k]
      kept = position < cap
      slot = jnp.where(kept, flat_expert * cap + position, e * cap)     # e*cap: dropped
      buf = jnp.zeros((e * cap, d), dt).at[slot].set(xf[flat_token].astype(dt), mode="drop")
      slot_expert = jnp.repeat(jnp.arange(e), cap)
      out = self._expert_mlp_dense(buf.reshape(e, cap, d), slot_expert).reshape(e * cap, d)
      gathered = jnp.take(out, slot, axis=0, mode="fill", fill_value=0)  # [N*k, D]
      contrib = gathered.astype(jnp.float32) * (flat_weight * kept)[:, None]
      y = jnp.zeros((b * t, d), jnp.float32).at[flat_token].add(contrib)
    return y.reshape(b, t, d).astype(dt)


def aux_losses(model: nnx.Module) -> dict[str, jax.Array]:
  """Mean over MoE layers of the load-balancing and router z-losses of the last forward pass
  ({} for a dense model)."""
  values: dict[str, list] = {}
  for path, v in nnx.to_flat_state(nnx.state(model, RouterStats)):
    values.setdefault(path[-1], []).append(v[...])
  return {name: jnp.mean(jnp.stack(vs)) for name, vs in values.items()}
