"""Gradient checkpointing per block (config.model.remat): what the backward pass keeps.

  none          everything (no recompute)
  full          only the block's input; the whole block runs again in the backward pass
  offload       as full, but the block inputs (2 * T * D bytes per sequence and layer in bf16)
                wait in host memory (pinned_host) instead of HBM, and come back one layer at a
                time in the backward pass: HBM for a batch no longer grows with the depth, at
                the price of a host round trip per layer, hidden behind compute when the link
                keeps up
  save_matmuls  every matmul output without a batch dimension (the weight matmuls)
  selective     Megatron's selective recompute: the tensors in NAMES (the q/k/v projections,
                attention's output and splash's softmax statistics, the MLP's matmul and
                activation outputs); recomputed are the attention core (scores, softmax: the
                [T, T] part) and the norms. Costs about one attention forward per layer.
  save_names    only the NAMES listed in config.model.remat_save_names (comma separated)

The model tags those tensors with jax.ad_checkpoint.checkpoint_name where it makes them.
"""

from __future__ import annotations

import jax

from polycom_jax.config_errors import require

POLICIES = ("none", "full", "offload", "save_matmuls", "selective", "save_names")
BLOCK_INPUT = "block_input"    # the name the model gives a block's input (policy "offload")
NAMES = ("q", "k", "v", "attn_out", "attn_residuals", "attn_proj", "mlp_up", "mlp_gate",
         "mlp_act", "mlp_out")


def _names(save_names: str) -> list[str]:
  return [n.strip() for n in save_names.split(",") if n.strip()]


def check(name: str, save_names: str) -> None:
  """ConfigError for an unknown policy or tensor name."""
  require(name in POLICIES, "config.model.remat", f"must be one of {POLICIES}, got {name!r}")
  unknown = [n for n in _names(save_names) if n not in NAMES]
  require(not unknown, "config.model.remat_save_names",
          f"has unknown names {unknown}; the named tensors are {NAMES}")
  require(name != "save_names" or _names(save_names), "config.model.remat_save_names",
          "must name at least one tensor when remat='save_names'")


def policy(name: str, save_names: str = ""):
  """The jax.checkpoint policy for a policy name other than "none" (None: save nothing)."""
  policies = jax.checkpoint_policies
  if name == "selective":
    return policies.save_only_these_names(*NAMES)
  if name == "save_names":
    return policies.save_only_these_names(*_names(save_names))
  if name == "offload":
    return policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT],
        offload_src="device", offload_dst="pinned_host")
  return {"full": None, "save_matmuls": policies.checkpoint_dots_with_no_batch_dims}[name]
