"""Decoder-only transformer (Llama-style) in Flax NNX with a configurable MLP activation.

Token embedding -> N x [RMSNorm -> causal GQA attention with RoPE -> residual,
RMSNorm -> MLP W_down(act(W_up x)) (gated: W_down(act(W_gate x) * W_up x)) -> residual]
-> RMSNorm -> output head. Parameters are float32 and carry logical axis names (`embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `vocab`) that sharding rules map onto a mesh; compute runs in
`ModelConfig.dtype`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from polycom_jax import activations
from polycom_jax import attention
from polycom_jax import grouped_matmul as gmm
from polycom_jax import moe
from polycom_jax import remat
from polycom_jax.model_counts import flops_per_token, num_params  # noqa: F401 (model_lib.*)
from polycom_jax.config_errors import require
from polycom_jax.layers import (DTYPES, HIDDEN, LOGITS, RESIDUAL, RMSNorm, over_sequence_chunks,
                                param, rope)
from polycom_jax.sharding import constrain

# QK-norm: none; "head": an RMSNorm over each head's Dh (Qwen3); "projection": over the whole
# q [H*Dh] and k [K*Dh] projections before the split into heads (OLMoE, OlmoeAttention).
QK_NORMS = ("none", "head", "projection")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's shape and numerics, resolved (no "auto", no 0 = default) and validated."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  activation: str = "polynorm"
  activation_impl: str = "auto"
  activation_order: int = 3
  activation_per_expert: bool = False
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  qk_norm: str = "none"
  tie_embeddings: bool = False
  init_std: float = 0.02
  output_init_std: float = 0.0        # attention out / MLP down projections; 0: init_std
  init_truncation: float = 0.0        # > 0: normal init cut at +-this many std (OLMo: 3)
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  document_mask: bool = False
  remat: str = "none"
  remat_save_names: str = ""          # remat="save_names": which of remat.NAMES to keep
  mlp_chunk: int = 0                  # > 0: the dense MLP runs this many positions at a time
  scan_layers: bool = False
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_d_ff: int = 0
  moe_impl: str = "ragged"
  moe_capacity_factor: float = 1.25
  moe_matmul: str = "auto"            # grouped matmuls: auto (TPU megablox), ragged_dot, megablox
  moe_renormalize: bool = False
  moe_aux_loss_weight: float = 0.0
  moe_z_loss_weight: float = 0.0

  def __post_init__(self):
    _validate(self)

  @property
  def gated(self) -> bool:
    return activations.get(self.activation).gated

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def output_std(self) -> float:
    """Init std of the projections that write into the residual stream (Megatron scales them
    by 1/sqrt(2 * num_layers))."""
    return self.output_init_std or self.init_std

  @classmethod
  def from_config(cls, model: Any, platform: str | None = None) -> ModelConfig:
    """Resolves config.model (a ConfigDict or a dict) into a validated ModelConfig: d_ff,
    head_dim, and dtype and attention_impl "auto" by the platform it will run on (default:
    JAX's default backend; the compile check passes "tpu")."""
    platform = platform or jax.default_backend()
    m = dict(model.to_dict() if hasattr(model, "to_dict") else model)
    act = activations.get(m.get("activation", "polynorm"))
    require(m.get("num_heads", 0) > 0, "config.model.num_heads", "must be > 0")
    require(m["d_model"] > 0, "config.model.d_model", "must be > 0")
    if not m.get("head_dim"):
      require(m["d_model"] % m["num_heads"] == 0, "config.model.d_model",
              f"({m['d_model']}) must be divisible by config.model.num_heads ({m['num_heads']})")
      m["head_dim"] = m["d_model"] // m["num_heads"]
    multiple = m.pop("d_ff_multiple_of", 128)
    ungated = m.pop("ungated_d_ff", 4 * m["d_model"])
    if not m.get("d_ff"):
      m["d_ff"] = matched_d_ff(ungated, act.gated, multiple)
    moe_ungated = m.pop("moe_ungated_d_ff", 0)
    if not m.get("moe_d_ff") and m.get("num_experts", 0) > 0:
      m["moe_d_ff"] = matched_d_ff(moe_ungated, act.gated, multiple) if moe_ungated else m["d_ff"]
    if isinstance(m.get("qk_norm"), bool):   # configs and checkpoints before the kinds
      m["qk_norm"] = "head" if m["qk_norm"] else "none"
    if m.get("dtype", "auto") == "auto":
      m["dtype"] = "float32" if platform == "cpu" else "bfloat16"
    m["attention_impl"] = attention.resolve_impl(m.get("attention_impl", "auto"), m["dtype"],
                                                 platform)
    m["moe_matmul"] = gmm.resolve_impl(m.get("moe_matmul", "auto"), platform)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(m) - known)
    require(not unknown, "config.model", f"has unknown fields {unknown}")
    return cls(**m)


def matched_d_ff(ungated_d_ff: int, gated: bool, multiple_of: int = 128) -> int:
  """MLP width with equal parameters: a gated MLP gets 2/3 of the ungated width, rounded up."""
  if not gated:
    return ungated_d_ff
  return multiple_of * math.ceil(2 * ungated_d_ff / 3 / multiple_of)


def _validate(c: ModelConfig):
  """Raises ConfigError naming the first invalid field."""
  activations.get(c.activation)
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "d_ff", "max_seq_len"):
    require(getattr(c, name) > 0, f"config.model.{name}", f"must be > 0, got {getattr(c, name)}")
  require(c.num_heads % c.num_kv_heads == 0, "config.model.num_heads",
          f"({c.num_heads}) must be divisible by config.model.num_kv_heads ({c.num_kv_heads})")
  require(c.activation_order >= 1, "config.model.activation_order",
          f"must be >= 1, got {c.activation_order}")
  require(c.activation_impl in activations.IMPLS, "config.model.activation_impl",
          f"must be one of {activations.IMPLS}, got {c.activation_impl!r}")
  require(c.head_dim % 2 == 0, "config.model.head_dim", f"must be even for RoPE, got {c.head_dim}")
  for name in ("dtype", "param_dtype"):
    require(getattr(c, name) in DTYPES, f"config.model.{name}",
            f"must be one of {tuple(DTYPES)} (or auto), got {getattr(c, name)!r}")
  remat.check(c.remat, c.remat_save_names)
  require(c.mlp_chunk >= 0, "config.model.mlp_chunk", f"must be >= 0, got {c.mlp_chunk}")
  require(not (c.mlp_chunk and c.num_experts), "config.model.mlp_chunk",
          "applies to the dense MLP only (the MoE routes and balances over all tokens); set 0")
  require(c.attention_impl in attention.IMPLS[1:], "config.model.attention_impl",
          f"must be one of {attention.IMPLS}, got {c.attention_impl!r}")
  require(c.init_std > 0, "config.model.init_std", f"must be > 0, got {c.init_std}")
  require(c.output_init_std >= 0, "config.model.output_init_std",
          f"must be >= 0 (0: init_std), got {c.output_init_std}")
  require(c.init_truncation == 0 or c.init_truncation >= 1, "config.model.init_truncation",
          f"must be 0 (plain normal) or >= 1 std, got {c.init_truncation}")
  require(c.qk_norm in QK_NORMS, "config.model.qk_norm",
          f"must be one of {QK_NORMS}, got {c.qk_norm!r}")
  require(c.norm_eps > 0, "config.model.norm_eps", f"must be > 0, got {c.norm_eps}")
  require(c.rope_theta > 1, "config.model.rope_theta", f"must be > 1, got {c.rope_theta}")
  require(c.num_experts >= 0, "config.model.num_experts", f"must be >= 0, got {c.num_experts}")
  if c.num_experts:
    require(0 < c.num_experts_per_tok <= c.num_experts, "config.model.num_experts_per_tok",
            f"must be in [1, num_experts={c.num_experts}], got {c.num_experts_per_tok}")
    require(c.moe_d_ff > 0, "config.model.moe_d_ff", f"must be > 0, got {c.moe_d_ff}")
    require(c.moe_impl in moe.MOE_IMPLS, "config.model.moe_impl",
            f"must be one of {moe.MOE_IMPLS}, got {c.moe_impl!r}")
    require(c.moe_matmul in gmm.IMPLS[1:], "config.model.moe_matmul",
            f"must be one of {gmm.IMPLS}, got {c.moe_matmul!r}")
    require(c.moe_capacity_factor > 0, "config.model.moe_capacity_factor",
            f"must be > 0, got {c.moe_capacity_factor}")
    for name in ("moe_aux_loss_weight", "moe_z_loss_weight"):
      require(getattr(c, name) >= 0, f"config.model.{name}",
              f"must be >= 0, got {getattr(c, name)}")


# ------------------------------------------------------------------------------------------------
# Layers

class Attention(nnx.Module):
  """Causal grouped-query attention with RoPE (and optional QK-norm)."""

  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.c = c
    pd, std, cut = DTYPES[c.param_dtype], c.init_std, c.init_truncation
    d, h, k, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, pd, truncate=cut)
    self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std, pd, truncate=cut)
    self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std, pd, truncate=cut)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), c.output_std, pd,
                    truncate=cut)
    if c.qk_norm == "head":
      self.q_norm = RMSNorm(hd, c.norm_eps, c.compute_dtype, pd, "head_dim")
      self.k_norm = RMSNorm(hd, c.norm_eps, c.compute_dtype, pd, "head_dim")
    elif c.qk_norm == "projection":
      self.q_norm = RMSNorm((h, hd), c.norm_eps, c.compute_dtype, pd, ("heads", "head_dim"))
      self.k_norm = RMSNorm((k, hd), c.norm_eps, c.compute_dtype, pd, ("kv_heads", "head_dim"))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               cache: dict | None = None, cache_index: jax.Array | None = None):
    c, dt = self.c, self.c.compute_dtype
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))       # [B, T, H, Dh]
    k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))       # [B, T, K, Dh]
    v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))
    if c.qk_norm != "none":
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    q, k, v = (checkpoint_name(y, n) for y, n in ((q, "q"), (k, "k"), (v, "v")))
    if cache is None:
      segments = segment_ids if c.document_mask else None
      out = attention.attend(q, k, v, segments, impl=c.attention_impl)
      new_cache = None
    else:
      # Decoding: write this chunk's keys/values at cache_index, attend to everything before.
      start = (0, cache_index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
      v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
      out = attention.xla_attention(q, k_all.astype(dt), v_all.astype(dt), None,
                                    kv_positions=jnp.arange(k_all.shape[1]),
                                    q_positions=positions)
      new_cache = {"k": k_all, "v": v_all}
    return checkpoint_name(jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt)),
                           "attn_proj"), new_cache


class MLP(nnx.Module):
  """W_down(act(W_up x)), or W_down(act(W_gate x) * W_up x) for gated activations."""

  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.c = c
    self.gated = c.gated
    pd, std, cut = DTYPES[c.param_dtype], c.init_std, c.init_truncation
    self.w_up = param(rngs, (c.d_model, c.d_ff), ("embed", "mlp"), std, pd, truncate=cut)
    if self.gated:
      self.w_gate = param(rngs, (c.d_model, c.d_ff), ("embed", "mlp"), std, pd, truncate=cut)
    self.w_down = param(rngs, (c.d_ff, c.d_model), ("mlp", "embed"), c.output_std, pd,
                        truncate=cut)
    self.act = activations.get(c.activation).make(
        order=c.activation_order, impl=c.activation_impl, logical_axes=HIDDEN)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.c.compute_dtype
    # Hidden units split over `tensor`: PolyNorm's row statistics then need a cross-device sum
    # (GSPMD inserts it for the jnp path; the fused kernel psums inside shard_map).
    h = checkpoint_name(constrain(x @ self.w_up[...].astype(dt), HIDDEN), "mlp_up")  # [B, T, F]
    if self.gated:
      gate = checkpoint_name(constrain(x @ self.w_gate[...].astype(dt), HIDDEN), "mlp_gate")
      h = self.act(gate) * h
    else:
      h = self.act(h)
    h = checkpoint_name(h, "mlp_act")
    return checkpoint_name(h @ self.w_down[...].astype(dt), "mlp_out")


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    pd = DTYPES[c.param_dtype]
    self.mlp_chunk = c.mlp_chunk
    self.attn_norm = RMSNorm(c.d_model, c.norm_eps, c.compute_dtype, pd)
    self.attn = Attention(c, rngs)
    self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, c.compute_dtype, pd)
    self.mlp = moe.MoE(c, rngs) if c.num_experts else MLP(c, rngs)

  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None):
    x = checkpoint_name(x, remat.BLOCK_INPUT)
    h, new_cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, cache_index)
    x = x + h
    # Position-wise, so it can run a chunk of the sequence at a time (config.model.mlp_chunk).
    mlp = over_sequence_chunks(lambda y: self.mlp(self.mlp_norm(y)), x, self.mlp_chunk)
    return x + mlp, new_cache


def head_logits(x: jax.Array, head: jax.Array) -> jax.Array:
  """Logits [..., V] (float32) of final hidden states x [..., D] under the head [D, V]."""
  return constrain((x @ head).astype(jnp.float32), LOGITS)


class Transformer(nnx.Module):
  """The language model: tokens [B, T] -> logits [B, T, vocab] (float32)."""

  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.c = c
    pd = DTYPES[c.param_dtype]
    self.embed = param(rngs, (c.vocab_size, c.d_model), ("vocab", "embed"), c.init_std, pd,
                       kind="embedding", truncate=c.init_truncation)
    if c.scan_layers:
      # One Block whose parameters carry a leading [num_layers] axis, logically named "layers"
      # (replicated by the default rules); __call__ scans over it.
      @nnx.split_rngs(splits=c.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked_blocks(rngs: nnx.Rngs) -> Block:
        return Block(c, rngs)
      self.layers = stacked_blocks(rngs)
    else:
      self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c.d_model, c.norm_eps, c.compute_dtype, pd)
    if not c.tie_embeddings:
      self.lm_head = param(rngs, (c.d_model, c.vocab_size), ("embed", "vocab"), c.init_std, pd,
                           truncate=c.init_truncation)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: list[dict] | None = None,
               cache_index: jax.Array | None = None):
    """Logits [B, T, V] (float32) for tokens; with `cache` (from init_cache) also returns the
    updated cache."""
    x, new_cache = self.hidden(tokens, positions, segment_ids, cache, cache_index)
    logits = head_logits(x, self.head())                                       # [B, T, V]
    return logits if cache is None else (logits, new_cache)

  def head(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the embedding's transpose if tied)."""
    head = self.embed[...].T if self.c.tie_embeddings else self.lm_head[...]
    return head.astype(self.c.compute_dtype)

  def hidden(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None):
    """The final-normed residual stream [B, T, D] that the head maps to logits, and the new
    cache (None without one). The loss applies the head itself, a chunk at a time."""
    c, dt = self.c, self.c.compute_dtype
    if positions is None:
      start = 0 if cache_index is None else cache_index
      positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
    x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(dt), RESIDUAL)  # [B, T, D]
    if c.scan_layers:
      x, new_cache = self._scan_layers(x, positions, segment_ids, cache, cache_index)
    else:
      new_cache = []
      for i, layer in enumerate(self.layers):
        if cache is None and c.remat != "none":
          x, _ = nnx.remat(lambda blk, y: blk(y, positions, segment_ids),
                           policy=remat.policy(c.remat, c.remat_save_names))(layer, x)
        else:
          x, layer_cache = layer(x, positions, segment_ids,
                                 None if cache is None else cache[i], cache_index)
          new_cache.append(layer_cache)
        x = constrain(x, RESIDUAL)
    return self.final_norm(x), (None if cache is None else new_cache)

  def _scan_layers(self, x, positions, segment_ids, cache, cache_index):
    """The stacked blocks applied in turn by one lax.scan: the step compiles one block, not
    num_layers of them. Router statistics (MoE) come back stacked [num_layers]."""
    c = self.c
    block_def, block_state = nnx.split(self.layers)     # every leaf [num_layers, ...]

    def body(x, layer):
      state, layer_cache = layer
      block = nnx.merge(block_def, state)
      x, new_cache = block(x, positions, segment_ids, layer_cache, cache_index)
      return constrain(x, RESIDUAL), (new_cache, nnx.state(block, nnx.Intermediate))

    if cache is None and c.remat != "none":
      body = jax.checkpoint(body, policy=remat.policy(c.remat, c.remat_save_names),
                            prevent_cse=False)
    x, (new_cache, stats) = jax.lax.scan(body, x, (block_state, cache))
    nnx.update(self.layers, stats)
    return x, new_cache


def init_cache(c: ModelConfig, batch: int, max_len: int) -> list[dict] | dict:
  """Zeroed key/value cache for decoding: per layer k, v of [B, max_len, kv_heads, head_dim]
  (with scan_layers, one {k, v} of [layers, B, max_len, kv_heads, head_dim])."""
  shape = (batch, max_len, c.num_kv_heads, c.head_dim)
  if c.scan_layers:
    shape = (c.num_layers, *shape)
    return {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}
  return [{"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}
          for _ in range(c.num_layers)]


# ------------------------------------------------------------------------------------------------
