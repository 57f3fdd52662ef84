"""Sparse mixture-of-experts MLP (OLMoE-style token-choice top-k) with PolyCom experts.

Each token's router picks k of E experts; each chosen expert runs the configured MLP on the
token (PolyNorm normalises over that expert's own hidden vector, per token and expert), and the
outputs are summed with the router weights. Two ways to compute it:
- "ragged" (dropless): sort the N*k (token, expert) assignments by expert and run grouped matmuls
  (`jax.lax.ragged_dot`) over the contiguous groups: no padding FLOPs, no dropped tokens.
- "capacity": each expert takes at most C = ceil(capacity_factor * N * k / E) assignments
  (later ones are dropped, in token order) into a dense [E, C, D] buffer and runs batched
  matmuls.
Under a mesh both run per shard (shard_map): each device routes its own N tokens against every
expert's weights, gathered layer by layer as FSDP gathers dense weights (the `expert` and `fsdp`
axes split the weights' storage and the tokens; no all-to-all), inside the shard_map, so their
gradients leave by reduce-scatter; capacity is then per shard.
- "dispatch" (expert parallel, moe_dispatch.py): the experts stay on the devices of the
  `expert` axis that hold them and the tokens are sent there and back by all_to_all, with a
  per-destination buffer of capacity_factor * N * k / P rows (dropless at capacity_factor >= P;
  the dropped fraction is the `moe_dropped` metric). Off a mesh it equals "ragged".
Either way the router statistics are summed over the shards, so the losses equal the one-device
ones. The grouped matmuls are grouped_matmul.py's (config.model.moe_matmul: megablox on TPU).
The fused Pallas activation runs inside as on one device. A `tensor` axis does not split this
work.
The layer records the Switch/OLMoE load-balancing loss and the router z-loss as
nnx.Intermediate values; `aux_losses(model)` collects them for the training loss.

By default the PolyCom coefficients (weight, bias) are ONE set per layer shared by all experts,
as in the paper's OLMoE code; `activation_per_expert=True` gives each expert its own.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from polycom_jax import activations
from polycom_jax import grouped_matmul as gmm
from polycom_jax import moe_dispatch
from polycom_jax import sharding
from polycom_jax.layers import DTYPES, RESIDUAL, constant_param, param

MOE_IMPLS = ("ragged", "capacity", "dispatch")
# Logical axes of the layer's arrays (the per-expert PolyCom coefficients' too).
AXES = {"router": ("embed", None), "w_up": ("expert", "embed", "mlp"),
        "w_gate": ("expert", "embed", "mlp"), "w_down": ("expert", "mlp", "embed"),
        "act_weight": ("expert", None), "act_bias": ("expert", None)}


class RouterStats(nnx.Intermediate):
  """Per-layer auxiliary losses of the router, read by aux_losses() after a forward pass."""


def aux_names(c) -> tuple[str, ...]:
  """What aux_losses returns for config c: the two router losses, and for "dispatch" the
  fraction of assignments its buffers dropped (a metric, not a loss)."""
  if not c.num_experts:
    return ()
  return ("load_balance", "router_z") + (("dropped",) if c.moe_impl == "dispatch" else ())


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
    self.c = c
    self.spec = activations.get(c.activation)
    pd, std, e, d, f = DTYPES[c.param_dtype], c.init_std, c.num_experts, c.d_model, c.moe_d_ff
    cut = c.init_truncation
    self.router = param(rngs, (d, e), AXES["router"], std, pd, truncate=cut)
    self.w_up = param(rngs, (e, d, f), AXES["w_up"], std, pd, truncate=cut)
    if self.spec.gated:
      self.w_gate = param(rngs, (e, d, f), AXES["w_gate"], std, pd, truncate=cut)
    self.w_down = param(rngs, (e, f, d), AXES["w_down"], c.output_std, pd, truncate=cut)
    if self.spec.has_params and c.activation_per_expert:
      r = c.activation_order
      self.act_weight = constant_param(jnp.full((e, r), 1.0 / r, jnp.float32),
                                       AXES["act_weight"], "activation")
      self.act_bias = constant_param(jnp.zeros((e, 1), jnp.float32), AXES["act_bias"],
                                     "activation")
    elif self.spec.has_params:            # one set shared by the experts (the paper's OLMoE)
      self.act = self.spec.make(order=c.activation_order, impl=c.activation_impl)

  def _weights(self) -> dict[str, jax.Array]:
    """The layer's arrays for the expert computation: matrices in the compute dtype, PolyCom
    coefficients [E or 1, r] / [E or 1, 1] (one row when shared by the experts)."""
    dt = self.c.compute_dtype
    w = {name: getattr(self, name)[...].astype(dt) for name in ("w_up", "w_gate", "w_down")
         if hasattr(self, name)}
    w["router"] = self.router[...]
    if self.spec.has_params:
      if self.c.activation_per_expert:
        w["act_weight"], w["act_bias"] = self.act_weight[...], self.act_bias[...]
      else:
        w["act_weight"], w["act_bias"] = self.act.weight[...][None], self.act.bias[...][None]
    return w

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.c
    b, t, d = x.shape
    w = self._weights()
    activate = functools.partial(self.spec.apply, impl=c.activation_impl)
    layout = sharding.active_layout(RESIDUAL)
    tokens_fn = {"ragged": _ragged_tokens, "capacity": _capacity_tokens,
                 "dispatch": _dispatch_tokens}[c.moe_impl]
    if layout is not None and _splits_rows(layout, b):
      # Each device routes and computes its own tokens. Left to GSPMD, the global sort
      # (ragged) or position cumsum (capacity) over every token would be replicated on every
      # chip. The weights enter in their own shards and are all-gathered inside, layer by
      # layer as FSDP gathers dense weights, so that their gradients leave by reduce-scatter
      # (a replicated input's would be all-reduced whole on every chip). The gather paths
      # gather every expert; dispatch keeps each device's own experts and sends tokens over
      # the expert axis.
      mesh, spec = layout
      axes = spec[0]
      _, expert_spec = sharding.active_layout(("expert",))
      ep_axes = expert_spec[0] if c.moe_impl == "dispatch" else None
      ep = math.prod(mesh.shape[a] for a in sharding.axes_of(ep_axes))
      shared = lambda name: name.startswith("act_") and not c.activation_per_expert
      w_specs = {name: P() if shared(name) else sharding.active_layout(AXES[name])[1]
                 for name in w}
      kept = {name: 0 for name in w if ep_axes is not None and AXES[name][0] == "expert"
              and not shared(name)}                     # dispatch: the expert dim stays split

      def per_shard(x, w):
        w = {name: _all_gather(v, w_specs[name], keep_dim=kept.get(name))
             for name, v in w.items()}
        with sharding.per_shard():
          y, sums = tokens_fn(x.reshape(-1, d), w, c=c, activate=activate,
                              matmul_impl=c.moe_matmul, ep_axes=ep_axes, ep=ep)
        return y.reshape(x.shape), jax.tree.map(lambda v: jax.lax.psum(v, axes), sums)
      # check_vma off: a Pallas call inside does not declare how its output varies.
      y, sums = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, w_specs),
                              out_specs=(spec, P()), check_vma=False)(x, w)
    else:
      # Off a mesh, or rows that do not split evenly over it: then GSPMD partitions the layer
      # (and the activation and grouped matmuls take their XLA paths, since GSPMD cannot
      # partition a Pallas call).
      impl = c.moe_matmul if layout is None else "ragged_dot"
      y, sums = tokens_fn(x.reshape(b * t, d), w, c=c, activate=activate, matmul_impl=impl,
                          ep_axes=None, ep=1)
      y = y.reshape(b, t, d)
    # Set on every call (not at construction) so the params-only state still merges.
    self.load_balance = RouterStats(_load_balance_from_sums(sums, c.num_experts_per_tok))
    self.router_z = RouterStats(sums["lse_squared"] / sums["tokens"])
    if c.moe_impl == "dispatch":
      self.dropped = RouterStats(sums["dropped"] / (sums["tokens"] * c.num_experts_per_tok))
    return checkpoint_name(y.astype(c.compute_dtype), "mlp_out")


def _all_gather(v: jax.Array, spec: P, keep_dim: int | None) -> jax.Array:
  """Inside shard_map: v's shard gathered whole along every split dim except keep_dim (its
  transpose, in the backward pass, is a reduce-scatter)."""
  for dim, entry in enumerate(spec):
    if dim != keep_dim and sharding.axes_of(entry):
      v = jax.lax.all_gather(v, sharding.axes_of(entry), axis=dim, tiled=True)
  return v


def _splits_rows(layout, batch: int) -> bool:
  """Whether the batch rows split evenly over the mesh axes the layout puts them on."""
  mesh, spec = layout
  axes = spec[0] if spec else None
  if axes is None:
    return False
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return batch % math.prod(mesh.shape[a] for a in axes) == 0


def _route(xf: jax.Array, w: dict, c):
  """(weights [N, k], experts [N, k], the router sums) for tokens xf [N, D]. The sums add up
  over shards: expert counts and probability sums give the load-balancing loss, the squared
  log-partitions the z-loss."""
  logits = xf.astype(jnp.float32) @ w["router"].astype(jnp.float32)    # [N, E]
  weights, experts, probs = route(logits, c.num_experts_per_tok, c.moe_renormalize)
  e = c.num_experts
  sums = {"counts": jnp.zeros((e,), jnp.float32).at[experts.reshape(-1)].add(1.0),
          "probs": jnp.sum(probs, axis=0),
          "lse_squared": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
          "tokens": jnp.asarray(xf.shape[0], jnp.float32)}
  return weights, experts, sums


def _load_balance_from_sums(sums: dict, k: int) -> jax.Array:
  """load_balancing_loss from summed counts and probabilities (equal to it on one shard)."""
  fraction = sums["counts"] / (sums["tokens"] * k)
  return sums["counts"].shape[0] * jnp.sum(fraction * sums["probs"] / sums["tokens"])


def _expert_mlp(xs, w, activate, expert_of_row, matmul):
  """W_down(act(W_up x)) (gated: act(W_gate x) * W_up x) with a given expert matmul; the
  activation gets each row's expert (for per-expert PolyCom coefficients)."""
  act = lambda h: activate(h, w.get("act_weight"), w.get("act_bias"), expert_of_row)
  h = matmul(xs, w["w_up"])
  if "w_gate" in w:
    h = act(matmul(xs, w["w_gate"])) * h
  else:
    h = act(h)
  return matmul(h, w["w_down"])


def _ragged_tokens(xf: jax.Array, w: dict, *, c, activate, matmul_impl, **_):
  """Dropless: the N*k assignments sorted by expert, grouped matmuls over the groups.
  xf [N, D] -> (y [N, D] float32, router sums)."""
  weights, experts, sums = _route(xf, w, c)
  order, rows_expert, rows_token = moe_dispatch.sort_by_expert(experts)
  group_sizes = jnp.bincount(rows_expert, length=c.num_experts).astype(jnp.int32)
  matmul = lambda a, b: gmm.grouped_matmul(a, b, group_sizes, matmul_impl)
  out = _expert_mlp(xf[rows_token].astype(c.compute_dtype), w, activate, rows_expert, matmul)
  return combine(out[jnp.argsort(order)], weights), sums


def combine(outs: jax.Array, weights: jax.Array) -> jax.Array:
  """y [N, D] (float32) = sum over k of weights [N, k] x outs [N * k, D] (token-major rows):
  a gather and a contraction, where a scatter-add of float32 [N * k, D] rows would hold the
  largest buffer of the layer."""
  n, k = weights.shape
  return jnp.einsum("nkd,nk->nd", outs.reshape(n, k, -1), weights.astype(outs.dtype),
                    preferred_element_type=jnp.float32)


def _dispatch_tokens(xf: jax.Array, w: dict, *, c, activate, matmul_impl, ep_axes, ep):
  """Expert parallel (moe_dispatch.py): w holds this device's E/ep experts."""
  weights, experts, sums = _route(xf, w, c)

  def expert_mlp(rows, group_sizes, local_expert):
    matmul = lambda a, b: gmm.grouped_matmul(a, b, group_sizes, matmul_impl)
    return _expert_mlp(rows, w, activate, local_expert, matmul)
  outs, dropped = moe_dispatch.dispatch_tokens(
      xf, experts, expert_mlp, num_experts=c.num_experts, capacity_factor=c.moe_capacity_factor,
      axis=ep_axes, num_shards=ep, dtype=c.compute_dtype)
  return combine(outs, weights), sums | {"dropped": dropped}


def _capacity_tokens(xf: jax.Array, w: dict, *, c, activate, **_):
  """Each expert takes at most C assignments (later ones dropped, in token order) into a dense
  [E, C, D] buffer: batched matmuls over every expert's weights (no all-to-all dispatch)."""
  weights, experts, sums = _route(xf, w, c)
  n, d = xf.shape
  e, k, dt = c.num_experts, c.num_experts_per_tok, c.compute_dtype
  cap = max(1, math.ceil(c.moe_capacity_factor * n * k / e))
  flat_expert = experts.reshape(-1)                                   # [N*k]
  flat_token = jnp.repeat(jnp.arange(n), k)
  one_hot = jax.nn.one_hot(flat_expert, e, dtype=jnp.int32)           # [N*k, E]
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # [N*k]
  kept = position < cap
  slot = jnp.where(kept, flat_expert * cap + position, e * cap)       # e*cap: dropped
  buf = jnp.zeros((e * cap, d), dt).at[slot].set(xf[flat_token].astype(dt), mode="drop")
  slot_expert = jnp.repeat(jnp.arange(e), cap)

  def matmul(a, b):                        # a [E*C, in] as [E, C, in] against b [E, in, out]
    return jnp.einsum("eci,eio->eco", a.reshape(e, cap, -1), b).reshape(e * cap, -1)
  out = _expert_mlp(buf, w, activate, slot_expert, matmul)           # [E*C, D]
  gathered = jnp.take(out, slot, axis=0, mode="fill", fill_value=0)  # [N*k, D], token-major
  return combine(gathered, weights * kept.reshape(n, k)), sums


def aux_losses(model: nnx.Module) -> dict[str, jax.Array]:
  """Mean over MoE layers of the load-balancing and router z-losses of the last forward pass
  ({} for a dense model)."""
  values: dict[str, list] = {}
  for path, v in nnx.to_flat_state(nnx.state(model, RouterStats)):
    values.setdefault(path[-1], []).append(v[...])
  return {name: jnp.mean(jnp.stack(vs)) for name, vs in values.items()}
