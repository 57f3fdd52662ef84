"""PolyNorm / PolyReLU and the baselines against float64 NumPy references written from the formula.

Tolerances: float32 paths agree with float64 to 3e-5 relative to the row's output scale;
bfloat16 inputs/outputs agree with the float64 value of the rounded input to 2**-7 (bf16 keeps
8 significant bits, the output rounding alone is 2**-8).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polycom_jax import activations
from polycom_jax.config_errors import ConfigError

EPS = 1e-6


# ---- float64 references, from shared/DESIGN.md and the gradient derivation in PAPER_NOTES.md ---

def np_poly_norm(x, w, b, eps=EPS):
  x = np.asarray(x, np.float64)
  r = len(w)
  y = np.full_like(x, float(b[0]))
  for p in range(1, r + 1):
    u = x ** p
    y += w[r - p] * u / np.sqrt(np.mean(u * u, -1, keepdims=True) + eps)
  return y


def np_poly_norm_grads(x, w, g, eps=EPS):
  """dL/dx, dL/dw, dL/db for L = sum(g * poly_norm(x))."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  r = len(w)
  dx, dw = np.zeros_like(x), np.zeros(r)
  for p in range(1, r + 1):
    u = x ** p
    rp = 1.0 / np.sqrt(np.mean(u * u, -1, keepdims=True) + eps)
    n = rp * u
    c = w[r - p]
    dx += c * p * x ** (p - 1) * rp * (g - n * np.mean(g * n, -1, keepdims=True))
    dw[r - p] = np.sum(rp * np.sum(g * u, -1, keepdims=True))
  return dx, dw, np.array([g.sum()])


def np_poly_norm_dx_scale(x, w, g, eps=EPS):
  """Size of the terms dL/dx is summed from: float32 rounding error is relative to this, not
  to dL/dx itself, which cancels to ~eps/x**2 for D = 1."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  r = len(w)
  total = np.zeros_like(x)
  for p in range(1, r + 1):
    u = x ** p
    rp = 1.0 / np.sqrt(np.mean(u * u, -1, keepdims=True) + eps)
    total += abs(w[r - p]) * p * np.abs(x) ** (p - 1) * rp * np.abs(g)
  return np.max(total)


def np_poly_relu(x, w, b):
  z = np.maximum(np.asarray(x, np.float64), 0)
  r = len(w)
  return sum(w[r - p] * z ** p for p in range(1, r + 1)) + float(b[0])


def np_poly_relu_grads(x, w, g):
  z = np.maximum(np.asarray(x, np.float64), 0)
  g = np.asarray(g, np.float64)
  r = len(w)
  dz = sum(p * w[r - p] * z ** (p - 1) for p in range(1, r + 1))
  dx = g * (z > 0) * dz
  dw = np.array([np.sum(g * z ** (r - i)) for i in range(r)])
  return dx, dw, np.array([g.sum()])


def _inputs(shape, order, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * scale
  w = rng.uniform(0.2, 1.0, order) * rng.choice([-1, 1], order)
  b = rng.standard_normal(1)
  g = rng.standard_normal(shape)
  return x, w, b, g


def _close(actual, expected, rel, scale=None):
  actual = np.asarray(actual, np.float64)
  scale = np.max(np.abs(expected)) + 1e-30 if scale is None else scale
  np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


def test_reference_gradient_formula_matches_finite_differences():
  """The float64 gradient formula used below is itself right (central differences)."""
  x, w, b, g = _inputs((3, 5), 3, 0)
  dx, dw, _ = np_poly_norm_grads(x, w, g)
  h = 1e-6
  for idx in [(0, 0), (1, 3), (2, 4)]:
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    fd = (np.sum(g * np_poly_norm(xp, w, b)) - np.sum(g * np_poly_norm(xm, w, b))) / (2 * h)
    assert abs(fd - dx[idx]) < 1e-6 * max(1, abs(fd))
  for i in range(3):
    wp, wm = w.copy(), w.copy()
    wp[i] += h
    wm[i] -= h
    fd = (np.sum(g * np_poly_norm(x, wp, b)) - np.sum(g * np_poly_norm(x, wm, b))) / (2 * h)
    assert abs(fd - dw[i]) < 1e-6 * max(1, abs(fd))


NORM_FNS = {
    "reference": activations.poly_norm_reference,
    "xla": lambda x, w, b: activations.poly_norm(x, w, b, EPS, impl="xla"),
}
RELU_FNS = {
    "reference": activations.poly_relu_reference,
    "xla": lambda x, w, b: activations.poly_relu(x, w, b, impl="xla"),
}


@pytest.mark.parametrize("fn", NORM_FNS)
@pytest.mark.parametrize("shape", [(4, 1), (4, 3), (7, 127), (5, 4096), (2, 3, 33)])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_poly_norm_f32_value_and_grads(fn, shape, order):
  x, w, b, g = _inputs(shape, order, seed=order * 100 + shape[-1])
  f = NORM_FNS[fn]
  y, vjp = jax.vjp(f, jnp.float32(x), jnp.float32(w), jnp.float32(b))
  assert y.dtype == jnp.float32 and y.shape == shape
  _close(y, np_poly_norm(x.astype(np.float32), w.astype(np.float32), b), 3e-5)
  dx, dw, db = vjp(jnp.float32(g))
  rdx, rdw, rdb = np_poly_norm_grads(x.astype(np.float32), w.astype(np.float32), g)
  _close(dx, rdx, 1e-4, np_poly_norm_dx_scale(x.astype(np.float32), w, g))
  _close(dw, rdw, 1e-4)
  _close(db, rdb, 1e-5)


@pytest.mark.parametrize("fn", NORM_FNS)
@pytest.mark.parametrize("scale", [1e-5, 1e-2, 1e2, 1e4, 1e6])
def test_poly_norm_large_and_tiny_magnitudes(fn, scale):
  """Rows of any magnitude stay finite and exact: x**6 of 1e6 would overflow float32."""
  x, w, b, g = _inputs((6, 257), 3, seed=7, scale=scale)
  y, vjp = jax.vjp(NORM_FNS[fn], jnp.float32(x), jnp.float32(w), jnp.float32(b))
  assert np.all(np.isfinite(y))
  _close(y, np_poly_norm(x.astype(np.float32), w, b), 3e-5)
  dx, dw, db = vjp(jnp.float32(g))
  rdx, rdw, _ = np_poly_norm_grads(x.astype(np.float32), w, g)
  assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
  _close(dw, rdw, 1e-4)
  _close(dx, rdx, 1e-4, np_poly_norm_dx_scale(x.astype(np.float32), w, g))


@pytest.mark.parametrize("fn", NORM_FNS)
@pytest.mark.parametrize("center", [0.0, 100.0])
def test_poly_norm_bf16(fn, center):
  """bf16 in, bf16 out, statistics in f32: a bf16 value near 100 has x**3 ~ 1e6, fine in f32."""
  x, w, b, g = _inputs((8, 1536), 3, seed=3)
  xb = jnp.asarray(x + center, jnp.bfloat16)
  y, vjp = jax.vjp(NORM_FNS[fn], xb, jnp.float32(w), jnp.float32(b))
  assert y.dtype == jnp.bfloat16
  x64 = np.asarray(xb, np.float64)
  _close(y, np_poly_norm(x64, w, b), 2 ** -7)
  dx, dw, _ = vjp(jnp.asarray(g, jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  rdx, rdw, _ = np_poly_norm_grads(x64, w, np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64))
  _close(dw, rdw, 2 ** -7)
  _close(dx, rdx, 2 ** -6, np_poly_norm_dx_scale(x64, w, g))


@pytest.mark.parametrize("fn", RELU_FNS)
@pytest.mark.parametrize("shape", [(4, 1), (7, 127), (5, 4096), (2, 3, 33)])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_poly_relu_f32_value_and_grads(fn, shape, order):
  x, w, b, g = _inputs(shape, order, seed=order + shape[-1])
  y, vjp = jax.vjp(RELU_FNS[fn], jnp.float32(x), jnp.float32(w), jnp.float32(b))
  x32 = x.astype(np.float32)
  _close(y, np_poly_relu(x32, w.astype(np.float32), b), 3e-6)
  dx, dw, db = vjp(jnp.float32(g))
  rdx, rdw, rdb = np_poly_relu_grads(x32, w.astype(np.float32), g)
  _close(dx, rdx, 1e-5)
  _close(dw, rdw, 1e-5)
  _close(db, rdb, 1e-5)


@pytest.mark.parametrize("fn", RELU_FNS)
def test_poly_relu_bf16(fn):
  x, w, b, _ = _inputs((8, 384), 3, seed=5, scale=3.0)
  xb = jnp.asarray(x, jnp.bfloat16)
  y = RELU_FNS[fn](xb, jnp.float32(w), jnp.float32(b))
  assert y.dtype == jnp.bfloat16
  _close(y, np_poly_relu(np.asarray(xb, np.float64), w, b), 2 ** -7)


def test_modules_params_and_init():
  for cls in (activations.PolyNorm, activations.PolyReLU):
    m = cls(order=4, impl="xla")
    np.testing.assert_array_equal(m.weight[...], np.full(4, 0.25, np.float32))
    np.testing.assert_array_equal(m.bias[...], np.zeros(1, np.float32))
    assert m.weight[...].dtype == jnp.float32
  x, _, _, _ = _inputs((3, 64), 3, seed=1)
  m = activations.PolyNorm(impl="xla")
  _close(m(jnp.float32(x)), np_poly_norm(x.astype(np.float32), np.full(3, 1 / 3), [0.0]), 3e-5)
  with pytest.raises(ConfigError, match="order"):
    activations.PolyNorm(order=0)


def test_public_functions_default_to_auto_impl():
  x, w, b, _ = _inputs((3, 64), 3, seed=2)
  _close(activations.poly_norm(jnp.float32(x), w, b), np_poly_norm(x.astype(np.float32), w, b),
         3e-5)
  with pytest.raises(ConfigError, match="impl"):
    activations.poly_norm(jnp.float32(x), w, b, impl="cuda")


def test_baselines_by_name():
  x = np.random.default_rng(0).standard_normal((4, 9))
  erf = np.vectorize(math.erf)
  expected = {
      "relu": np.maximum(x, 0),
      "gelu": 0.5 * x * (1 + erf(x / math.sqrt(2))),
      "relu2": np.maximum(x, 0) ** 2,
      "silu": x / (1 + np.exp(-x)),
      "swiglu": x / (1 + np.exp(-x)),
      "geglu": 0.5 * x * (1 + erf(x / math.sqrt(2))),
  }
  for name, ref in expected.items():
    act = activations.get(name)
    assert act.gated == (name in ("swiglu", "geglu"))
    _close(act.make()(jnp.float32(x)), ref, 1e-6)
  assert isinstance(activations.get("polynorm").make(order=2), activations.PolyNorm)
  assert isinstance(activations.get("polyrelu").make(), activations.PolyReLU)


def test_unknown_activation_lists_known_names():
  with pytest.raises(ConfigError) as e:
    activations.get("polynom")
  for name in ("polynorm", "polyrelu", "relu", "gelu", "relu2", "silu", "swiglu", "geglu"):
    assert name in str(e.value)


# ---- gated PolyCom MLPs: W_down(poly(x W_gate) * (x W_up)), the activation on the gate --------

GLU_REFS = {"polynorm_glu": (np_poly_norm, np_poly_norm_grads),
            "polyrelu_glu": (np_poly_relu, np_poly_relu_grads)}


def np_glu_mlp_and_grads(x, wg, wu, wd, w, b, g, name):
  """The gated MLP's output and its gradients (x, W_gate, W_up, W_down, weight, bias) for
  L = sum(g * y), in float64 by the chain rule through the activation's reference gradients."""
  value, grads = GLU_REFS[name]
  h, u = x @ wg, x @ wu
  a = value(h, w, b)
  m = a * u
  dm = g @ wd.T
  dh, dw, db = grads(h, w, dm * u)
  du = dm * a
  return m @ wd, (dh @ wg.T + du @ wu.T, x.T @ dh, x.T @ du, m.T @ g, dw, db)


@pytest.mark.parametrize("name", GLU_REFS)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gated_polycom_mlp_matches_float64(name, impl):
  """model.MLP with a gated PolyCom activation: one set of coefficients on the gate, values and
  every gradient against float64 (the fused kernel in interpret mode for "pallas"); odd widths."""
  from flax import nnx
  from configs import tiny
  from polycom_jax import model as model_lib
  c = tiny.get_config().model
  c.update(activation=name, d_model=24, ungated_d_ff=0, d_ff=37, activation_impl=impl)
  mlp = model_lib.MLP(model_lib.ModelConfig.from_config(c), nnx.Rngs(0))
  assert mlp.gated and mlp.act.weight[...].shape == (3,)
  rng = np.random.default_rng(7)
  x, g = rng.standard_normal((5, 24)), rng.standard_normal((5, 24))
  wg, wu, wd = (rng.standard_normal(s) / np.sqrt(s[0]) for s in ((24, 37), (24, 37), (37, 24)))
  w, b = rng.uniform(0.2, 1.0, 3) * np.array([1, -1, 1]), rng.standard_normal(1)
  graphdef, state = nnx.split(mlp, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.float32, {
      "w_gate": wg, "w_up": wu, "w_down": wd, "act": {"weight": w, "bias": b}}))

  def loss(state, x):
    y = nnx.merge(graphdef, state)(x)
    return jnp.sum(jnp.float32(g) * y), y

  (_, y), (dstate, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state,
                                                                                 jnp.float32(x))
  dp = nnx.to_pure_dict(dstate)
  ry, (rdx, rdwg, rdwu, rdwd, rdw, rdb) = np_glu_mlp_and_grads(x, wg, wu, wd, w, b, g, name)
  _close(y, ry, 1e-5)
  for got, want in ((dx, rdx), (dp["w_gate"], rdwg), (dp["w_up"], rdwu), (dp["w_down"], rdwd),
                    (dp["act"]["weight"], rdw), (dp["act"]["bias"], rdb)):
    _close(got, want, 1e-4)
