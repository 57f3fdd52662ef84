"""The attention backends against a float64 reference, forward and backward.

Splash runs in Pallas interpret mode here (the kernel's own code, interpreted on CPU); cuDNN
needs a GPU and is checked by benchmarks/gpu_suite.py, but its segment layout is checked here.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polycom_jax import attention
from polycom_jax.config_errors import ConfigError
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(q, k, v, segment_ids):
  """float64 numpy: causal softmax attention, a token sees earlier tokens of its segment."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  k = np.repeat(k, h // k.shape[2], axis=2)
  v = np.repeat(v, h // v.shape[2], axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  allowed = np.tril(np.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])[:, None]
  scores = np.where(allowed, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


def _segments(rng, b, t, counts):
  """Rows of `counts[i]` documents of random lengths, then a random run of padding (0)."""
  rows = []
  for n in counts:
    pad = int(rng.integers(0, t // 4))
    cuts = np.sort(rng.choice(np.arange(1, t - pad), n - 1, replace=False)) if n > 1 else []
    ids = np.zeros(t, np.int32)
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, t - pad])):
      ids[lo:hi] = i + 1
    rows.append(ids)
  return jnp.asarray(np.stack(rows[:b]))


def _qkv(rng, b, t, h, kh, d):
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return draw(b, t, h, d), draw(b, t, kh, d), draw(b, t, kh, d)


CASES = [  # (name, heads, kv heads, documents per row or None)
    ("causal MHA", 4, 4, None),
    ("causal GQA", 4, 2, None),
    ("segments GQA, odd counts", 4, 2, (3, 5)),
    ("segments MHA, one segment per row", 2, 2, (1, 1)),
    ("segments MQA", 4, 1, (7, 2)),
]


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("name,h,kh,counts", CASES, ids=[c[0] for c in CASES])
def test_backends_match_the_float64_reference_forward_and_backward(impl, name, h, kh, counts):
  del name
  rng = np.random.default_rng(h * 10 + kh)
  b, t, d = 2, 128, 16
  q, k, v = _qkv(rng, b, t, h, kh, d)
  seg = None if counts is None else _segments(rng, b, t, counts)
  out = jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, impl=impl))(q, k, v)
  np.testing.assert_allclose(out, reference(q, k, v, seg), atol=2e-5, rtol=2e-5)
  # Gradients against XLA's autodiff of the float64 formula (jax with x64 off: compare the
  # float32 XLA path, itself checked above, at the same tolerance).
  cotangent = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  grads = grad(lambda q, k, v: attention.attend(q, k, v, seg, impl=impl))
  ref = grad(lambda q, k, v: _jnp_reference(q, k, v, seg))
  for got, want in zip(grads, ref):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def _jnp_reference(q, k, v, seg):
  """The reference formula in jnp (for its autodiff), with repeated kv heads."""
  h = q.shape[2]
  k, v = (jnp.repeat(x, h // x.shape[2], axis=2) for x in (k, v))
  t = q.shape[1]
  scores = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
  allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])[:, None]
  probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v, precision="highest")


def test_cudnn_segment_layout_covers_every_token_once():
  """cuDNN's ragged layout: segments in order, padding as the last one, -1 after."""
  seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  lengths, offsets = attention.segment_offsets(seg)
  assert lengths.tolist() == [[2, 3, 1, 2, -1, -1, -1, -1], [8, -1, -1, -1, -1, -1, -1, -1]]
  assert offsets.tolist() == [[0, 2, 5, 6, 8, -1, -1, -1, -1], [0, 8, -1, -1, -1, -1, -1, -1, -1]]


def test_auto_resolves_by_platform_and_bad_combinations_are_named():
  assert attention.resolve_impl("auto", "bfloat16", "tpu") == "splash"
  assert attention.resolve_impl("auto", "bfloat16", "gpu") == "cudnn"
  assert attention.resolve_impl("auto", "float32", "gpu") == "xla"
  assert attention.resolve_impl("auto", "float32", "cpu") == "xla"
  with pytest.raises(ConfigError, match="cudnn.*needs config.model.dtype"):
    attention.resolve_impl("cudnn", "float32", "gpu")
  with pytest.raises(ConfigError, match="splash.*is a TPU kernel"):
    attention.resolve_impl("splash", "bfloat16", "gpu")
  with pytest.raises(ConfigError, match="attention_impl must be one of"):
    attention.resolve_impl("flash", "bfloat16", "gpu")


def test_splash_per_shard_on_eight_devices_equals_xla():
  """Under a data x tensor mesh of 8 fake CPU devices splash runs per shard in shard_map
  (batch over data/fsdp, heads over tensor): values and gradients equal the XLA path's."""
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, capture_output=True,
                        text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu",
                                 XLA_FLAGS=xla_flags(8)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ok shard_map" in proc.stdout


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from polycom_jax import attention, sharding
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2, 1), sharding.MESH_AXES)
rng = np.random.default_rng(0)
b, t, h, kh, d = 4, 128, 4, 2, 16
q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(b, t, kh, d)), jnp.float32) for _ in range(2))
seg = jnp.asarray(np.repeat(np.arange(1, 5), 32)[None].repeat(b, 0), jnp.int32)
def loss(impl):
  def f(q, k, v):
    return jnp.sum(jnp.sin(attention.attend(q, k, v, seg, impl=impl)))
  return f
run = jax.jit(sharding.with_activation_sharding(jax.value_and_grad(loss("splash"), (0, 1, 2)),
                                                mesh, sharding.DEFAULT_RULES))
program = str(jax.make_jaxpr(run)(q, k, v))
assert "shard_map" in program and "pallas_call" in program, program[:2000]
got = run(q, k, v)
want = jax.value_and_grad(loss("xla"), (0, 1, 2))(q, k, v)
for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, b_, atol=1e-4, rtol=1e-4)
print("ok shard_map")
"""


def test_a_model_on_splash_equals_the_model_on_xla_with_packed_documents():
  """The whole Transformer (document masking on, GQA) gives the same logits with either
  backend: the layer passes q, k, v and the segment ids through unchanged."""
  from flax import nnx
  from polycom_jax import model as model_lib
  base = dict(vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
              ungated_d_ff=128, d_ff_multiple_of=32, max_seq_len=128, document_mask=True)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, 97, (2, 128)), jnp.int32)
  seg = _segments(rng, 2, 128, (4, 2))
  logits = {}
  for impl in ("xla", "splash"):
    mc = model_lib.ModelConfig.from_config(dict(base, attention_impl=impl))
    logits[impl] = model_lib.Transformer(mc, nnx.Rngs(0))(tokens, segment_ids=seg)
  np.testing.assert_allclose(logits["splash"], logits["xla"], atol=1e-4, rtol=1e-4)


def test_splash_needs_rows_of_multiples_of_128():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from polycom_jax import setup as setup_lib
  config = tiny_config("unused/*.txt", "unused")
  config.model.attention_impl = "splash"
  with pytest.raises(ConfigError, match="'splash' needs config.data.seq_len to be a multiple"):
    setup_lib.validate_config(config)
  # auto, resolved for the platform the run targets (the compile check: the topology's "tpu").
  config.model.attention_impl, config.model.dtype = "auto", "auto"
  assert setup_lib.validate_config(config, "tpu").attention_impl == "xla"   # 32 positions
  config.data.seq_len = config.model.max_seq_len = 256
  on_tpu = setup_lib.validate_config(config, "tpu")
  assert (on_tpu.attention_impl, on_tpu.dtype) == ("splash", "bfloat16")
  assert setup_lib.validate_config(config).attention_impl == "xla"          # this CPU
