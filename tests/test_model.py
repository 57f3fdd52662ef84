"""The dense transformer: every activation trains (forward + backward), counts are exact,
attention is causal, the KV cache reproduces the full forward, bad configs are refused."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from polycom_jax import activations, layers, model, param_layouts
from polycom_jax.config_errors import ConfigError


def _model_config(**overrides) -> model.ModelConfig:
  cfg = default.get_config()
  cfg.model.num_layers = 2
  cfg.model.update(overrides)
  return model.ModelConfig.from_config(cfg.model)


def _tokens(c, shape=(2, 12), seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, c.vocab_size)


@pytest.mark.parametrize("name", list(activations.REGISTRY))
def test_forward_backward_every_activation(name):
  """The default config's model runs forward + backward for each activation, finite grads
  reaching every parameter (the PolyCom coefficients included)."""
  c = _model_config(activation=name)
  m = model.Transformer(c, nnx.Rngs(0))
  tokens = _tokens(c)

  @nnx.jit
  def loss_and_grads(m, tokens):
    def loss_fn(m):
      logits = m(tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return nnx.value_and_grad(loss_fn)(m)

  loss, grads = loss_and_grads(m, tokens)
  assert np.isfinite(loss) and abs(loss - np.log(c.vocab_size)) < 0.5
  flat = nnx.to_flat_state(grads)
  for path, g in flat:
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f"no gradient reaches {path}"
  names = {"/".join(map(str, p)) for p, _ in flat}
  if activations.get(name).has_params:
    assert any(n.endswith("mlp/act/weight") for n in names)


@pytest.mark.parametrize("overrides", [
    {"activation": "polynorm"},
    {"activation": "swiglu", "tie_embeddings": True},
    {"activation": "polyrelu", "qk_norm": "head", "activation_order": 4},
    {"activation": "gelu", "num_kv_heads": 4, "head_dim": 16},
    {"activation": "swiglu", "qk_norm": "projection", "num_kv_heads": 2},
])
def test_num_params_counts_the_arrays(overrides):
  c = _model_config(**overrides)
  m = model.Transformer(c, nnx.Rngs(0))
  actual = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert model.num_params(c) == actual


def test_gated_and_ungated_widths_match_parameters():
  """Default config: 2/3 of the ungated width for gated MLPs gives the same parameter count."""
  ungated = _model_config(activation="gelu")
  gated = _model_config(activation="swiglu")
  assert (ungated.d_ff, gated.d_ff) == (576, 384)
  assert model.num_params(ungated) == model.num_params(gated)
  assert model.matched_d_ff(8256, gated=True) == 5504      # the paper's 1B widths
  assert model.matched_d_ff(1000, gated=True, multiple_of=128) == 768
  assert _model_config(activation="swiglu", d_ff=200).d_ff == 200


def test_every_parameter_has_logical_axis_names_and_a_kind():
  c = _model_config(activation="polynorm", qk_norm="projection")
  m = model.Transformer(c, nnx.Rngs(0))
  for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    assert v.get_metadata().get("param_kind") in layers.PARAM_KINDS, path
    names = v.get_metadata().get("out_sharding")
    if path[-2:] in (("act", "weight"), ("act", "bias")):
      continue                                   # replicated PolyCom coefficients
    assert names is not None and len(names) == v[...].ndim, path


def test_attention_is_causal():
  c = _model_config()
  m = model.Transformer(c, nnx.Rngs(0))
  tokens = _tokens(c, (1, 10))
  changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % c.vocab_size)
  a, b = m(tokens), m(changed)
  np.testing.assert_array_equal(a[0, :6], b[0, :6])
  assert not np.allclose(a[0, 6:], b[0, 6:])


def test_document_mask_isolates_packed_documents():
  c = _model_config(document_mask=True)
  m = model.Transformer(c, nnx.Rngs(0))
  tokens = _tokens(c, (1, 10))
  seg = jnp.array([[1] * 4 + [2] * 6])
  pos = jnp.array([list(range(4)) + list(range(6))])
  packed = m(tokens, positions=pos, segment_ids=seg)
  alone = m(tokens[:, 4:])
  np.testing.assert_allclose(packed[:, 4:], alone, atol=2e-5, rtol=1e-5)


def test_kv_cache_decoding_matches_full_forward():
  """Prefill 5 tokens, then decode one at a time: logits equal the uncached forward."""
  c = _model_config(activation="polynorm")
  m = model.Transformer(c, nnx.Rngs(0))
  tokens = _tokens(c, (2, 9))
  full = m(tokens)
  cache = model.init_cache(c, batch=2, max_len=16)
  logits, cache = m(tokens[:, :5], cache=cache, cache_index=jnp.int32(0))
  steps = [logits]
  for t in range(5, 9):
    logits, cache = m(tokens[:, t:t + 1], cache=cache, cache_index=jnp.int32(t))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_cached_decoding_equals_argmax_of_the_uncached_forward(scan_layers):
  """Greedy decoding with the KV cache picks, token by token, the argmax of the full forward of
  the sequence so far (a wrong cache index or mask changes the picks or the logits)."""
  c = _model_config(activation="polynorm", init_std=0.2, scan_layers=scan_layers)
  m = model.Transformer(c, nnx.Rngs(1))
  prompt = _tokens(c, (1, 4), seed=3)
  cache = model.init_cache(c, batch=1, max_len=16)
  cached = nnx.jit(lambda m, x, cache, i: m(x, cache=cache, cache_index=i))
  uncached = nnx.jit(lambda m, x: m(x))
  logits, cache = cached(m, prompt, cache, jnp.int32(0))
  seq = prompt
  for pos in range(prompt.shape[1], 12):
    cached_last = logits[0, -1]
    full_last = uncached(m, seq)[0, -1]                            # the uncached forward
    np.testing.assert_allclose(cached_last, full_last, atol=2e-5, rtol=1e-5, err_msg=str(pos))
    token = int(jnp.argmax(cached_last))
    assert token == int(jnp.argmax(full_last)), pos
    seq = jnp.concatenate([seq, jnp.full((1, 1), token, seq.dtype)], axis=1)
    logits, cache = cached(m, seq[:, -1:], cache, jnp.int32(pos))
  assert len(set(np.asarray(seq[0, 4:]).tolist())) > 1      # not one token repeated: a real test


def test_projection_qk_norm_normalises_the_whole_projection():
  """qk_norm="projection" (OLMoE): RMSNorm with a [H*Dh] gain over the whole q projection
  before the split into heads, not per head (which would equal it only if every head had the
  same mean square)."""
  norm = layers.RMSNorm((4, 8), 1e-5, jnp.float32, jnp.float32, ("heads", "head_dim"))
  rng = np.random.default_rng(0)
  gain = rng.uniform(0.5, 1.5, (4, 8)).astype(np.float32)
  norm.scale[...] = jnp.asarray(gain)
  q = rng.standard_normal((2, 3, 4, 8)).astype(np.float32) * np.array([1, 2, 3, 4])[:, None]
  flat = q.reshape(2, 3, 32).astype(np.float64)
  expected = flat / np.sqrt(np.mean(flat ** 2, axis=-1, keepdims=True) + 1e-5) * gain.ravel()
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(q))).reshape(2, 3, 32), expected,
                             rtol=1e-5, atol=1e-6)
  per_head = q / np.sqrt(np.mean(q.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5)
  assert np.max(np.abs(per_head * gain - expected.reshape(q.shape))) > 0.1


def test_rope_scores_depend_only_on_the_position_difference():
  """<rope(q, m), rope(k, n)> is a function of m - n: shifting both positions keeps every score,
  and a different offset changes it."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 3, 16)), jnp.float32)   # [B, T, H, Dh]
  k = jnp.asarray(rng.standard_normal((1, 1, 3, 16)), jnp.float32)

  def score(m_pos: int, n_pos: int) -> np.ndarray:
    rq = layers.rope(q, jnp.full((1, 1), m_pos), 10000.0)
    rk = layers.rope(k, jnp.full((1, 1), n_pos), 10000.0)
    return np.asarray(jnp.sum(rq * rk, axis=-1))[0, 0]                # [H]

  for offset in (0, 3, -5):
    base = score(7 + offset, 7)
    for shift in (1, 40, 1000):
      np.testing.assert_allclose(score(7 + offset + shift, 7 + shift), base, atol=1e-4,
                                 rtol=1e-4, err_msg=f"offset {offset}, shift {shift}")
  assert np.max(np.abs(score(10, 7) - score(7, 7))) > 1e-2


@pytest.mark.parametrize("policy", ["full", "offload", "save_matmuls", "selective", "save_names"])
def test_remat_gives_the_same_gradients(policy):
  # Recomputation may fuse differently: float32 rounding, ~1e-6 of each gradient's scale.
  for (p, a), (_, b) in zip(_gradients("none"), _gradients(policy)):
    scale = float(np.max(np.abs(a[...])))
    np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-5 * scale, err_msg=str(p))


@functools.cache
def _gradients(policy: str) -> list:
  """Flat gradients of sum(logits) of the default 2-layer model under a remat policy."""
  c = _model_config(remat=policy, remat_save_names="q,k,v,mlp_act")
  tokens = _tokens(c)
  grads = nnx.jit(nnx.grad(lambda m: m(tokens).sum()))(model.Transformer(c, nnx.Rngs(0)))
  return list(nnx.to_flat_state(grads))


def _saved(c, tokens) -> list:
  """The residuals the backward pass of sum(logits) keeps: (shape, what) pairs."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  graphdef, params = nnx.split(model.Transformer(c, nnx.Rngs(0)))
  return [(tuple(a.shape), why) for a, why in
          saved_residuals(lambda p: nnx.merge(graphdef, p)(tokens).sum(), params)]


def test_selective_remat_recomputes_the_attention_scores_and_keeps_the_projections():
  """Without remat the XLA path keeps the softmax [B, K, G, T, T] of every layer; "selective"
  keeps none of it but still the named projections (so the matmuls are not run again), and
  save_names keeps exactly what it names."""
  tokens = _tokens(_model_config(), shape=(2, 12))
  square = lambda saved: [s for s, _ in saved if len(s) >= 2 and s[-2:] == (12, 12)]
  assert square(_saved(_model_config(), tokens))
  selective = _saved(_model_config(remat="selective"), tokens)
  assert not square(selective)
  whys = " ".join(why for _, why in selective)
  for name in ("'q'", "'k'", "'v'", "'attn_out'", "'mlp_up'"):
    assert name in whys, (name, whys)
  only_q = _saved(_model_config(remat="save_names", remat_save_names="q"), tokens)
  named = " ".join(why for _, why in only_q if "named" in why)
  assert "'q'" in named and "'k'" not in named and "'mlp_up'" not in named, named
  with pytest.raises(ConfigError, match="remat_save_names.*unknown names"):
    _model_config(remat="save_names", remat_save_names="q,scores")


def test_offload_remat_sends_the_block_inputs_to_host_memory():
  """Under "offload" each block's saved [B, T, D] input is the output of a device_put (to
  pinned_host; the TPU compile check shows the bytes in host memory); "full" saves the same
  tensors in place."""
  def moved(policy):
    c = _model_config(remat=policy)
    return [s for s, why in _saved(c, _tokens(c)) if "device_put" in why]
  assert moved("offload") == [(2, 12, 128)] * 2 and moved("full") == []


def test_chunked_mlp_equals_the_whole_sequence_and_keeps_no_full_hidden_state():
  """mlp_chunk=4 of 12 positions: the same logits and gradients (float32, to rounding), and
  the backward keeps no [B, T, d_ff] hidden state (each chunk's is recomputed)."""
  whole, chunked = _model_config(), _model_config(mlp_chunk=4)
  tokens = _tokens(whole)
  value_and_grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2)))
  loss, grads = value_and_grad(model.Transformer(whole, nnx.Rngs(0)))
  loss_c, grads_c = value_and_grad(model.Transformer(chunked, nnx.Rngs(0)))
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  for (p, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_c)):
    np.testing.assert_allclose(b[...], a[...], rtol=1e-5,
                               atol=1e-6 * float(np.max(np.abs(a[...]))), err_msg=str(p))
  # Hidden states [B, T, d_ff] (or stacked chunks of them), not the [D, d_ff] weights.
  hidden = lambda c: [s for s, _ in _saved(c, tokens) if len(s) >= 3 and s[-1] == c.d_ff]
  assert hidden(whole) and not hidden(chunked), hidden(chunked)


def test_flops_per_token_by_hand():
  c = _model_config(activation="gelu", num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                    head_dim=0, d_ff=256, vocab_size=128)
  attn_proj = 64 * 16 * (2 * 4 + 2 * 2)
  mlp = 2 * 64 * 256
  expected = 6 * (2 * (attn_proj + mlp) + 64 * 128) + 6 * 2 * 32 * 4 * 16
  assert model.flops_per_token(c, seq_len=32) == expected


@pytest.mark.parametrize("overrides, field", [
    ({"d_model": 130}, "config.model.d_model"),
    ({"num_kv_heads": 3}, "config.model.num_heads"),
    ({"activation": "polynom"}, "config.model.activation"),
    ({"activation_order": 0}, "config.model.activation_order"),
    ({"num_layers": 0}, "config.model.num_layers"),
    ({"vocab_size": -1}, "config.model.vocab_size"),
    ({"dtype": "float8"}, "config.model.dtype"),
    ({"remat": "some"}, "config.model.remat"),
    ({"mlp_chunk": -1}, "config.model.mlp_chunk"),
    ({"mlp_chunk": 4, "num_experts": 4, "num_experts_per_tok": 2}, "config.model.mlp_chunk"),
    ({"activation_impl": "triton"}, "config.model.activation_impl"),
    ({"rope_theta": 0.0}, "config.model.rope_theta"),           # trained NaN to "done" before
    ({"qk_norm": "per_layer"}, "config.model.qk_norm"),
])
def test_invalid_configs_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    _model_config(**overrides)


@pytest.mark.parametrize("overrides", [
    {"activation": "polynorm", "remat": "full"},
    {"activation": "swiglu", "qk_norm": "projection"},
    {"activation": "polyrelu", "num_experts": 4, "num_experts_per_tok": 2, "moe_ungated_d_ff": 96},
], ids=["polynorm-remat", "swiglu-qk_norm", "polyrelu-moe"])
def test_scanned_layers_equal_the_unrolled_stack(overrides):
  """scan_layers=True with the unrolled model's weights stacked: the same logits, gradients,
  router losses and cached decoding; parameters carry the `layers` axis name."""
  from polycom_jax import moe
  c = _model_config(num_layers=3, d_model=64, num_heads=4, num_kv_heads=2, **overrides)
  c_scan = dataclasses.replace(c, scan_layers=True)
  unrolled, scanned = model.Transformer(c, nnx.Rngs(0)), model.Transformer(c_scan, nnx.Rngs(1))
  params = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  stacked = param_layouts.stack_layers(params)
  scan_params = nnx.state(scanned, nnx.Param)
  for path, v in nnx.to_flat_state(scan_params):
    if path[0] == "layers" and v.get_metadata().get("out_sharding"):
      assert v.get_metadata()["out_sharding"][0] == "layers", path
      assert v.shape[0] == 3, path
  nnx.replace_by_pure_dict(scan_params, stacked)
  nnx.update(scanned, scan_params)
  assert sum(x.size for x in jax.tree.leaves(scan_params)) == model.num_params(c_scan)
  jax.tree.map(np.testing.assert_array_equal, param_layouts.unstack_layers(stacked), params)

  tokens = _tokens(c, (2, 9))

  @nnx.jit
  def logits_aux_grads(m):
    def loss(m):
      logits = m(tokens)
      aux = moe.aux_losses(m)
      return jnp.mean(logits ** 2) + sum(aux.values(), jnp.zeros(())), (logits, aux)
    (_, (logits, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(m)
    return logits, aux, nnx.to_pure_dict(nnx.state(grads))

  logits, aux, grads = logits_aux_grads(unrolled)
  logits_s, aux_s, grads_s = logits_aux_grads(scanned)
  np.testing.assert_allclose(logits_s, logits, atol=2e-5, rtol=1e-5)
  assert set(aux_s) == set(aux) == ({"load_balance", "router_z"} if c.num_experts else set())
  for name in aux:
    np.testing.assert_allclose(aux_s[name], aux[name], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               param_layouts.unstack_layers(grads_s), grads)

  cache, cache_scan = model.init_cache(c, 2, 12), model.init_cache(c_scan, 2, 12)
  assert cache_scan["k"].shape == (3, 2, 12, c.num_kv_heads, c.head_dim)
  for start, stop in ((0, 5), (5, 6), (6, 9)):
    a, cache = unrolled(tokens[:, start:stop], cache=cache, cache_index=jnp.int32(start))
    b, cache_scan = scanned(tokens[:, start:stop], cache=cache_scan, cache_index=jnp.int32(start))
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-5)
