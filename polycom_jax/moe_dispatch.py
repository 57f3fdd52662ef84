"""Expert parallelism (config.model.moe_impl="dispatch"): tokens travel to the devices that
hold their experts, instead of every expert's weights travelling to every device.

With an `expert` mesh axis of size P, the device at position i on it holds experts
[i * E/P, (i + 1) * E/P) (gathered over `fsdp` like dense weights, never over `expert`). Per
layer and device, inside the MoE's shard_map:
1. the device routes its own N tokens (top-k, as on one device): A = N * k assignments, sorted
   by expert, so each destination device's assignments are contiguous;
2. they are packed into a send buffer of P blocks of C rows, C = ceil(capacity_factor * A / P)
   (at most A): block j holds, in expert order, the first C assignments bound for device j;
   later ones are dropped: their tokens skip the expert (the residual stream carries them),
   and the fraction dropped is the `moe_dropped` metric. capacity_factor >= P never drops;
3. one all_to_all over `expert` delivers to each device the rows for its experts (P blocks of
   C), with their local expert ids;
4. the device sorts the rows it received by expert and runs the expert MLP as grouped matmuls
   (grouped_matmul.py: megablox on TPU); empty slots sort last, into no group;
5. a second all_to_all returns the outputs to the devices their tokens came from, which sum
   each token's k outputs with its router weights (moe.combine).
Bytes on the wire per layer and device: two all_to_alls of P * C * D values (there and back) in
the forward pass, again in full remat's recompute and in the backward pass: about
12 * capacity_factor * N * k * D bytes in bf16, against the gather path's experts' weights
(all-gathered forward, their gradients all-reduced backward). Dispatch wins when tokens per
device are few relative to the experts' weights (many experts, or small per-device batches):
benchmarks/RESULTS.md, "MoE at scale".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sort_by_expert(experts: jax.Array):
  """The N * k assignments of experts [N, k] in expert order (stable: token order within an
  expert): (order [A] into the token-major assignments, their experts [A], their tokens [A])."""
  flat_expert = experts.reshape(-1)                                   # [A], A = N * k
  order = jnp.argsort(flat_expert, stable=True)
  return order, flat_expert[order], order // experts.shape[1]


def dispatch_tokens(xf: jax.Array, experts: jax.Array, expert_mlp, *, num_experts: int,
                    capacity_factor: float, axis: str | tuple | None, num_shards: int, dtype):
  """(outputs [N * k, D] of every assignment, token-major, zero where dropped; the count of
  dropped assignments) for tokens xf [N, D] routed to `experts` [N, k]. expert_mlp(rows,
  group_sizes, local_expert) runs this device's E/P experts on rows grouped by expert. axis/num_shards: the mesh axis
  (or axes) that holds the experts and its size (None, 1: one device, no exchange)."""
  n, d = xf.shape
  k = experts.shape[1]
  local = num_experts // num_shards
  a = n * k
  cap = max(1, min(a, math.ceil(capacity_factor * a / num_shards)))
  order, sorted_expert, sorted_token = sort_by_expert(experts)
  dest = sorted_expert // local                                       # [A] destination device
  per_dest = jnp.bincount(dest, length=num_shards)
  first_of_dest = jnp.cumsum(per_dest) - per_dest
  position = jnp.arange(a) - first_of_dest[dest]
  kept = position < cap
  slot = jnp.where(kept, dest * cap + position, num_shards * cap)    # out of range: dropped
  rows = num_shards * cap
  send_x = jnp.zeros((rows, d), dtype).at[slot].set(xf[sorted_token].astype(dtype), mode="drop")
  # Local expert id per slot; `local` (one past the last) marks an empty slot.
  send_e = jnp.full((rows,), local, jnp.int32).at[slot].set(sorted_expert % local, mode="drop")

  exchange = ((lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True))
              if axis is not None and num_shards > 1 else (lambda v: v))
  recv_x, recv_e = exchange(send_x), exchange(send_e)                 # [P * C, D], [P * C]
  by_expert = jnp.argsort(recv_e, stable=True)
  group_sizes = jnp.bincount(recv_e, length=local + 1)[:local].astype(jnp.int32)
  out = expert_mlp(recv_x[by_expert], group_sizes,
                   jnp.minimum(recv_e[by_expert], local - 1))         # [P * C, D]
  out = jnp.zeros_like(out).at[by_expert].set(out)                    # back to arrival order
  returned = exchange(out)                                            # in send_x's layout
  # Each assignment's output in token-major order; a dropped one's slot is out of range: zeros.
  outs = jnp.take(returned, slot[jnp.argsort(order)], axis=0, mode="fill", fill_value=0)
  return outs, jnp.sum(~kept).astype(jnp.float32)
