"""Parameter and FLOP counts of a model config, exact and without building the model (re-exported
by model.py: model_lib.num_params, model_lib.flops_per_token)."""

from __future__ import annotations

from polycom_jax import activations


def num_params(c) -> int:
  """Exact parameter count from the config (equals the sum of the parameter arrays' sizes)."""
  act_params = (c.activation_order + 1) if activations.get(c.activation).has_params else 0
  attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  attn += {"none": 0, "head": 2 * c.head_dim,
           "projection": (c.num_heads + c.num_kv_heads) * c.head_dim}[c.qk_norm]
  per_layer = attn + 2 * c.d_model + _mlp_params(c, act_params)
  head = 0 if c.tie_embeddings else c.d_model * c.vocab_size
  return c.vocab_size * c.d_model + c.num_layers * per_layer + c.d_model + head


def _mlp_params(c, act_params: int, active_only: bool = False) -> int:
  mats = 3 if c.gated else 2
  if not c.num_experts:
    return mats * c.d_model * c.d_ff + act_params
  experts = c.num_experts_per_tok if active_only else c.num_experts
  act = act_params * (c.num_experts if c.activation_per_expert else 1)
  return experts * mats * c.d_model * c.moe_d_ff + c.d_model * c.num_experts + act


def flops_per_token(c, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), MaxText's convention.

  Counts the matmuls only (elementwise work, norms and activations are not counted): 6 x the
  matmul parameters a token passes through (for MoE, the active experts and the router), the
  output head included and the embedding lookup excluded, plus causal attention
  (QK^T and AV, halved for the causal mask): 6 * layers * seq_len * heads * head_dim.
  """
  attn_proj = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = _mlp_params(c, 0, active_only=True)
  matmul_params = c.num_layers * (attn_proj + mlp) + c.d_model * c.vocab_size
  attention = 6 * c.num_layers * seq_len * c.num_heads * c.head_dim
  return 6.0 * matmul_params + attention
