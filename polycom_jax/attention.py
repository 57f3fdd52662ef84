"""Causal (grouped-query) self-attention behind one interface, with a backend per platform.

`attend(q, k, v, segment_ids, impl=...)` takes q [B, T, H, Dh], k and v [B, T, K, Dh] (K divides
H) and returns [B, T, H, Dh]; with segment_ids [B, T] (packed documents, 0 = padding) a token
sees only earlier tokens of its own segment. Backends (config.model.attention_impl; "auto" is
resolved with the platform when the config is, see `resolve_impl`):

  splash  TPU: the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu), flash-style
          (no [T, T] scores in HBM), causal + segment ids, GQA natively; under a multi-device
          mesh it runs per shard in shard_map over the batch and head axes. On CPU it runs in
          Pallas interpret mode (tests only: slow).
  cudnn   GPU: cuDNN's fused flash attention (bfloat16 / float16 only); packed documents are
          passed as per-row segment offsets and lengths (cuDNN's ragged layout), not as a mask.
  xla     everywhere: jnp einsums. The [B, H, T, T] scores exist, but the mask is computed from
          iota and segment ids inside the fusion, never passed in as a dense array.

Every backend tags its output `attn_out` (and splash its softmax statistics `attn_residuals`)
for the remat policies in model.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from polycom_jax import sharding
from polycom_jax.config_errors import ConfigError

IMPLS = ("auto", "xla", "cudnn", "splash")
_HALF = ("bfloat16", "float16")

# Logical names of q [B, T, H, Dh] and k/v [B, T, K, Dh] for the per-shard (shard_map) layout.
Q_AXES = ("activation_batch", "activation_length", "activation_heads", None)
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", None)
SEGMENT_AXES = ("activation_batch", "activation_length")


def resolve_impl(impl: str, dtype: str, platform: str | None = None) -> str:
  """The backend for `impl` on `platform` (default: JAX's default backend) at compute `dtype`:
  "auto" is splash on TPU, cuDNN on GPU in bfloat16/float16 (XLA in float32), XLA on CPU.
  ConfigError for a combination that cannot run."""
  if impl not in IMPLS:
    raise ConfigError(f"config.model.attention_impl must be one of {IMPLS}, got {impl!r}")
  platform = platform or jax.default_backend()
  if impl == "auto":
    if platform == "tpu":
      return "splash"
    if platform == "gpu" and dtype in _HALF:
      return "cudnn"
    return "xla"
  if impl == "cudnn" and dtype not in _HALF:
    raise ConfigError(f"config.model.attention_impl='cudnn' needs config.model.dtype in {_HALF}"
                      f" (cuDNN's flash attention has no {dtype} kernel); use 'xla' for {dtype}")
  if impl == "cudnn" and platform not in ("gpu", "cuda"):
    raise ConfigError(f"config.model.attention_impl='cudnn' runs on NVIDIA GPUs only, not on "
                      f"{platform}")
  if impl == "splash" and platform not in ("tpu", "cpu"):
    raise ConfigError(f"config.model.attention_impl='splash' is a TPU kernel (on CPU it runs "
                      f"interpreted, for tests); on {platform} use 'cudnn' or 'xla'")
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
           impl: str) -> jax.Array:
  """Causal attention [B, T, H, Dh] of q over k, v (see the module docstring)."""
  _, _, h, _ = q.shape
  if h % k.shape[2]:
    raise ConfigError(f"num_heads ({h}) must be a multiple of num_kv_heads ({k.shape[2]})")
  if impl == "splash":
    out = _splash_sharded(q, k, v, segment_ids)
  elif impl == "cudnn":
    out = _cudnn(q, k, v, segment_ids)
  elif impl == "xla":
    out = xla_attention(q, k, v, segment_ids)
  else:
    raise ConfigError(f"attention impl {impl!r} is not resolved (one of {IMPLS[1:]})")
  return checkpoint_name(out, "attn_out")


# ------------------------------------------------------------------------------------------------
# XLA

def xla_attention(q, k, v, segment_ids, kv_positions=None, q_positions=None):
  """Plain softmax attention, f32 scores and softmax. Causal by index, or (decoding, with a
  cache) key position <= query position when q_positions/kv_positions [B, T]/[S] are given."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d)                                   # [B, T, K, G, Dh]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                      preferred_element_type=jnp.float32) / math.sqrt(d)  # [B, K, G, T, S]
  s = k.shape[1]
  if q_positions is None:
    allowed = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]              # [T, S]
    allowed = allowed[None, None, None]
  else:
    allowed = (kv_positions[None, None, :] <= q_positions[:, :, None])[:, None, None]
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                # [B, T, S]
    allowed = allowed & same[:, None, None]
  scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


# ------------------------------------------------------------------------------------------------
# cuDNN (GPU)

def segment_offsets(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cuDNN's ragged layout of packed rows: (lengths [B, M], offsets [B, M + 1]) with M = T, -1
  past the last segment. Every token belongs to one: documents 1, 2, ... and then the padding
  run (id 0, at the end of a row) as a segment of its own, as the XLA path treats it."""
  b, t = segment_ids.shape
  # Padding (0) becomes one more id after the row's last document.
  ids = jnp.where(segment_ids > 0, segment_ids, jnp.max(segment_ids, axis=1, keepdims=True) + 1)
  starts = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  index = jnp.broadcast_to(jnp.arange(t), (b, t))
  # The start index of every segment in order, then t (the row's end), then -1s.
  order = jnp.sort(jnp.where(starts, index, t + 1), axis=1)                  # [B, T]
  count = jnp.sum(starts, axis=1, keepdims=True)                             # [B, 1]
  slot = jnp.arange(t + 1)[None]
  padded = jnp.concatenate([order, jnp.full((b, 1), t + 1)], axis=1)
  offsets = jnp.where(slot < count, padded, jnp.where(slot == count, t, -1))  # [B, T + 1]
  lengths = jnp.where(slot[:, :t] < count, offsets[:, 1:] - offsets[:, :-1], -1)
  return lengths.astype(jnp.int32), offsets.astype(jnp.int32)


def _cudnn(q, k, v, segment_ids):
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  # Packed documents: jax.nn.dot_product_attention would turn a mask into a dense [B, 1, T, T]
  # bias; the fused op takes the segments as offsets and lengths instead.
  # pylint: disable-next=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  lengths, offsets = segment_offsets(segment_ids)
  return cudnn.dot_product_attention(
      q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
      scale=1.0 / math.sqrt(q.shape[-1]), mask_type=cudnn.MaskType.PADDING_CAUSAL)


# ------------------------------------------------------------------------------------------------
# Splash (TPU)

def block_size(seq_len: int) -> int:
  """Splash tile along the sequence: the largest of 512, 256, 128 that divides seq_len."""
  for b in (512, 256, 128):
    if seq_len % b == 0:
      return b
  raise ConfigError(f"splash attention needs a sequence length that is a multiple of 128, got "
                    f"{seq_len}; use config.model.attention_impl='xla'")


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
  """Built per trace, not cached: the kernel holds its mask tables as arrays, which would be
  one trace's tracers in the next (the mask preprocessing is cheap numpy)."""
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel, splash_attention_mask as masks)
  blk = block_size(seq_len)
  sizes = kernel.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                            block_kv_dkv=blk, block_kv_dkv_compute=blk,
                            use_fused_bwd_kernel=True)
  mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * num_heads)
  return kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                residual_checkpoint_name="attn_residuals",
                                interpret=interpret), kernel.SegmentIds


def _splash(q, k, v, segment_ids):
  """One shard: q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh]. The Mosaic kernel when
  lowered for TPU (also ahead of time from a CPU host), Pallas interpret mode elsewhere."""
  t, h, d = q.shape[1:]
  to_heads = lambda x: jnp.swapaxes(x, 1, 2)                                # [B, H, T, Dh]
  q = to_heads(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype))
  k, v = to_heads(k), to_heads(v)

  def branch(interpret):
    kernel, segment_type = _splash_kernel(h, t, interpret)

    def run(q, k, v, *segments):
      if not segments:
        return jax.vmap(kernel)(q, k, v)
      one = lambda a, b_, c, s: kernel(a, b_, c, segment_ids=segment_type(s, s))
      return jax.vmap(one)(q, k, v, segments[0])
    return run

  segments = () if segment_ids is None else (segment_ids,)
  out = jax.lax.platform_dependent(q, k, v, *segments, tpu=branch(False), default=branch(True))
  return to_heads(out)


def _splash_sharded(q, k, v, segment_ids):
  """Splash per shard under a multi-device mesh (XLA cannot partition a Pallas call): batch
  rows over the batch axes, heads over the tensor axis (q and kv heads split alike, so each
  shard keeps whole GQA groups)."""
  layout = sharding.active_layout(Q_AXES)
  if layout is None:
    return _splash(q, k, v, segment_ids)
  mesh, q_spec = layout
  _, kv_spec = sharding.active_layout(KV_AXES)
  _, seg_spec = sharding.active_layout(SEGMENT_AXES)
  head_shards = math.prod(mesh.shape[a] for a in sharding.axes_of(q_spec[2]))
  if k.shape[2] % head_shards:
    raise ConfigError(f"num_kv_heads ({k.shape[2]}) must be a multiple of the {head_shards} "
                      "shards of the head axis for splash attention")

  def body(q, k, v, segment_ids=None):
    with sharding.per_shard():
      return _splash(q, k, v, segment_ids)

  specs = (q_spec, kv_spec, kv_spec) + ((seg_spec,) if segment_ids is not None else ())
  args = (q, k, v) + ((segment_ids,) if segment_ids is not None else ())
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=q_spec,
                       check_vma=False)(*args)
