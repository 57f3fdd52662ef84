"""Fused PolyNorm / PolyReLU kernels against float64 NumPy references written from the formulas.

Both impls run: "xla" (custom-VJP jnp) and "pallas" (interpret mode on CPU, with Triton's block
layout and masks). The interpreter fills output buffers with NaN before the kernel runs and pads
inputs with NaN to whole blocks, so an element a kernel fails to write, or a padded column it fails
to mask, shows up as NaN (test_interpreter_poisons_what_a_kernel_leaves_unwritten shows both).

Tolerances, relative to the size of the terms each value is summed from (per row for y and dx:
float32 rounding scales with those terms, not with the result, which can cancel):
float32 1e-5 (y, dweight, dbias) and 2e-5 (dx); bfloat16 1e-2 (inputs rounded to bf16 first and
the reference evaluated in float64 on the rounded values; bf16 output rounding alone is 2**-8).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from polycom_jax import activations, kernels
from polycom_jax.kernels import rowwise

EPS = 1e-6
REL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


# ---- float64 references (shared/DESIGN.md; gradients from shared/PAPER_NOTES.md) -----------------

def np_poly_norm(x, w, b, g, eps=EPS):
  """y, dx, dweight, dbias of sum(g * poly_norm(x)), each with the scale of its summed terms."""
  r = len(w)
  y, y_scale = np.full_like(x, b[0]), np.full_like(x, abs(b[0]))
  dx, dx_scale = np.zeros_like(x), np.zeros_like(x)
  dw, dw_scale = np.zeros(r), np.zeros(r)
  for p in range(1, r + 1):
    c, u = w[r - p], x ** p
    rp = 1.0 / np.sqrt(np.mean(u * u, -1, keepdims=True) + eps)
    n = rp * u
    mean_gn = np.mean(g * n, -1, keepdims=True)
    y += c * n
    y_scale += abs(c * n)
    dx += c * p * x ** (p - 1) * rp * (g - n * mean_gn)
    dx_scale += abs(c * p * x ** (p - 1) * rp) * (abs(g) + abs(n * mean_gn))
    dw[r - p] = np.sum(rp * np.sum(g * u, -1, keepdims=True))
    dw_scale[r - p] = np.sum(rp * np.sum(abs(g * u), -1, keepdims=True))
  return ((y, dx, dw, np.array([g.sum()])),
          (_row_max(y_scale), _row_max(dx_scale), dw_scale, np.array([abs(g).sum()])))


def np_poly_relu(x, w, b, g):
  """As np_poly_norm, for PolyReLU: y = b + sum_p c_p relu(x)**p."""
  r, z = len(w), np.maximum(x, 0.0)
  y, y_scale = np.full_like(x, b[0]), np.full_like(x, abs(b[0]))
  slope, slope_scale = np.zeros_like(x), np.zeros_like(x)
  dw, dw_scale = np.zeros(r), np.zeros(r)
  for p in range(1, r + 1):
    c = w[r - p]
    y += c * z ** p
    y_scale += abs(c * z ** p)
    slope += p * c * z ** (p - 1)
    slope_scale += abs(p * c * z ** (p - 1))
    dw[r - p], dw_scale[r - p] = np.sum(g * z ** p), np.sum(abs(g) * z ** p)
  dx = np.where(x > 0, g * slope, 0.0)
  return ((y, dx, dw, np.array([g.sum()])),
          (_row_max(y_scale), _row_max(abs(g) * slope_scale), dw_scale, np.array([abs(g).sum()])))


def _row_max(a):
  return np.max(a, axis=-1, keepdims=True)


# ---- helpers -------------------------------------------------------------------------------------

def _inputs(shape, order, dtype, seed, row_scales=None):
  """x, dy in dtype (row_scales multiply rows), weight [r] with mixed signs, bias [1], float32."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if row_scales is not None:
    x *= np.reshape(row_scales, (-1,) + (1,) * (len(shape) - 1))
  w = rng.uniform(0.2, 1.0, order) * rng.choice([-1, 1], order)
  b = rng.standard_normal(1)
  g = rng.standard_normal(shape)
  return (jnp.asarray(x, dtype), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
          jnp.asarray(g, dtype))


def _f64(a):
  return np.asarray(a, np.float64)


def _make_step(kernel, impl):
  """(x, weight, bias, dy) -> (y, dx, dweight, dbias) of one kernel/impl."""
  def step(x, w, b, g):
    if kernel == "norm":
      fn = lambda x, w, b: kernels.poly_norm(x, w, b, EPS, impl=impl)
    else:
      fn = lambda x, w, b: kernels.poly_relu(x, w, b, impl=impl)
    y, vjp = jax.vjp(fn, x, w, b)
    return (y, *vjp(g))
  return step


@functools.cache
def _step(kernel, impl):
  """_make_step jitted once per kernel/impl and shared by the tests (jit caches shapes)."""
  return jax.jit(_make_step(kernel, impl))


def _check(kernel, outputs, inputs, rel):
  """outputs (y, dx, dw, db) against the float64 reference, within rel of each term scale."""
  x, w, b, g = inputs
  reference = np_poly_norm if kernel == "norm" else np_poly_relu
  expected, scales = reference(_f64(x), _f64(w), _f64(b), _f64(g))
  dtypes = (x.dtype, x.dtype, w.dtype, b.dtype)
  for name, actual, e, scale, dtype, r in zip(("y", "dx", "dweight", "dbias"), outputs, expected,
                                              scales, dtypes, (rel, 2 * rel, rel, rel)):
    assert actual.dtype == dtype and actual.shape == e.shape, (name, actual.dtype, actual.shape)
    a = _f64(actual)
    assert np.all(np.isfinite(a)), f"{name}: NaN/inf (an unwritten or unmasked element)"
    worst = np.max(np.abs(a - e) / (scale + 1e-300))
    assert worst <= r, f"{name}: error {worst:.2e} of its scale > {r:.0e}"


# ---- values and gradients ------------------------------------------------------------------------

CASES = [  # shape, dtype, order
    ((1, 8), jnp.float32, 3),
    ((1000, 4096), jnp.float32, 3),
    ((37, 1536), jnp.float32, 3),
    ((2, 5, 127), jnp.float32, 3),
    ((4, 1), jnp.float32, 3),
    ((4, 3), jnp.float32, 3),
    ((2, 5, 127), jnp.float32, 1),
    ((2, 5, 127), jnp.float32, 2),
    ((2, 5, 127), jnp.float32, 4),
    ((4, 3), jnp.float32, 1),
    ((4, 1), jnp.float32, 4),
    ((1, 8), jnp.bfloat16, 3),
    ((37, 1536), jnp.bfloat16, 3),
    ((2, 5, 127), jnp.bfloat16, 3),
    ((4, 3), jnp.bfloat16, 2),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{jnp.dtype(t).name}-r{r}" for s, t, r in CASES]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("kernel", ["norm", "relu"])
@pytest.mark.parametrize("shape,dtype,order", CASES, ids=CASE_IDS)
def test_value_and_grads_match_float64(kernel, impl, shape, dtype, order):
  inputs = _inputs(shape, order, dtype, seed=shape[-1] + order)
  _check(kernel, _step(kernel, impl)(*inputs), inputs, REL[dtype])


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_poly_norm_rows_of_any_magnitude(impl):
  """Rows scaled by 1e4, 1e6 (x**6 would overflow float32 unscaled), 1e-4, 1e-6 and 0."""
  inputs = _inputs((7, 257), 3, jnp.float32, seed=11,
                   row_scales=[1.0, 1e4, 1e6, 1e-4, 1e-6, 0.0, 3.0])
  _check("norm", _step("norm", impl)(*inputs), inputs, REL[jnp.float32])


def test_tpu_blocks_in_tpu_interpret_mode(monkeypatch):
  """The TPU variant (unmasked loads, D-wide blocks of 8 rows with a partial last block, weights in
  SMEM) run by Pallas's TPU simulator, which also fills unwritten memory with NaN."""
  asked = []

  def tpu_tiling(backend, rows, cols, itemsize):
    asked.append(backend)
    return rowwise.Tiling("tpu", 8, cols, interpret=pltpu.InterpretParams())

  monkeypatch.setattr(rowwise, "choose_tiling", tpu_tiling)
  for kernel in ("norm", "relu"):
    inputs = _inputs((21, 130), 3, jnp.bfloat16, seed=5)
    _check(kernel, jax.jit(_make_step(kernel, "pallas"))(*inputs), inputs, REL[jnp.bfloat16])
  assert "interpret" in asked


def test_interpreter_poisons_what_a_kernel_leaves_unwritten():
  """The premise of the NaN checks: unwritten outputs and unmasked padding read as NaN."""
  def copy_first_block(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((16, 128), jnp.float32)
  y = pl.pallas_call(copy_first_block, jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                     in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                     out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)), interpret=True)(x)
  assert np.all(np.asarray(y[:8]) == 1) and np.all(np.isnan(np.asarray(y[8:])))

  def row_sum(x_ref, o_ref):  # no mask: the padded columns of the (1, 4) block are summed
    o_ref[...] = jnp.sum(x_ref[...], axis=1, keepdims=True)

  s = pl.pallas_call(row_sum, jax.ShapeDtypeStruct((1, 1), jnp.float32),
                     in_specs=[pl.BlockSpec((1, 4), lambda: (0, 0))],
                     out_specs=pl.BlockSpec((1, 1), lambda: (0, 0)), interpret=True)(
                         jnp.ones((1, 3), jnp.float32))
  assert np.isnan(np.asarray(s)).all()


def test_activations_dispatch_to_the_kernels():
  x, w, b, _ = _inputs((3, 64), 3, jnp.float32, seed=2)
  for impl in ("xla", "pallas"):
    np.testing.assert_array_equal(activations.poly_norm(x, w, b, impl=impl),
                                  kernels.poly_norm(x, w, b, EPS, impl=impl))
    np.testing.assert_array_equal(activations.poly_relu(x, w, b, impl=impl),
                                  kernels.poly_relu(x, w, b, impl=impl))
  with pytest.raises(ValueError, match="impl"):
    kernels.poly_norm(x, w, b, impl="triton")


# ---- lowering for TPU (Mosaic) and GPU (Triton) without the hardware -----------------------------

CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _lowered_text(kernel, platform, rows, d, dtype):
  """StableHLO of the forward and of value-and-grad (forward + backward kernels) for platform."""
  fn = ((lambda x, w, b: kernels.poly_norm(x, w, b, EPS, impl="pallas")) if kernel == "norm"
        else (lambda x, w, b: kernels.poly_relu(x, w, b, impl="pallas")))
  grad = jax.value_and_grad(lambda x, w, b: jnp.sum(fn(x, w, b).astype(jnp.float32)),
                            argnums=(0, 1, 2))
  args = (jax.ShapeDtypeStruct((rows, d), dtype), jax.ShapeDtypeStruct((3,), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32))
  return [jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
          for f in (fn, grad)]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("kernel", ["norm", "relu"])
@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 1536), (jnp.float32, 8192)])
def test_lowers_to_mosaic_and_triton(kernel, platform, dtype, d):
  fwd, grad = _lowered_text(kernel, platform, 1000, d, dtype)
  assert fwd.count(CUSTOM_CALL[platform]) == 1
  assert grad.count(CUSTOM_CALL[platform]) == 2  # the forward kernel and the backward kernel


def test_rows_too_wide_for_a_block_fall_back_to_xla():
  assert rowwise.choose_tiling("tpu", 64, 32768, 2) is not None
  assert rowwise.choose_tiling("tpu", 64, 32769, 4) is None
  assert rowwise.choose_tiling("triton", 64, 65537, 2) is None
  fwd, grad = _lowered_text("norm", "tpu", 16, 40000, jnp.float32)
  assert "tpu_custom_call" not in fwd + grad and "rsqrt" in fwd


@pytest.mark.parametrize("rows,d,itemsize", [(1000, 1536, 2), (1000, 8192, 4), (37, 127, 2),
                                             (5, 1, 4), (100000, 32768, 2)])
def test_block_sizes_respect_each_backend(rows, d, itemsize):
  tpu = rowwise.choose_tiling("tpu", rows, d, itemsize)
  assert tpu.block_cols == d and (tpu.block_rows % 8 == 0 or tpu.block_rows == rows)
  assert tpu.block_rows * -(-d // 128) * 128 * 4 <= rowwise.TPU_BLOCK_BYTES
  gpu = rowwise.choose_tiling("triton", rows, d, itemsize)
  assert gpu.block_cols >= d
  for n in (gpu.block_rows, gpu.block_cols):
    assert n & (n - 1) == 0
  cpu = rowwise.choose_tiling("interpret", rows, d, itemsize)  # big blocks: few grid steps
  assert cpu.interpret and cpu.block_rows * cpu.block_cols >= min(rows * d, 1 << 19)


# ---- memory: the custom VJP saves x (and per-row stats), not the intermediates -------------------

def test_custom_vjp_needs_less_temp_memory_than_autodiff():
  def temp_bytes(act):
    def loss(params, x):
      w1, w2, w, b = params
      return jnp.mean((act(x @ w1, w, b) @ w2) ** 2)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(
        (f32(256, 2048), f32(2048, 256), f32(3), f32(1)), f32(4096, 256)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  autodiff = temp_bytes(lambda h, w, b: activations.poly_norm_reference(h, w, b, EPS))
  fused = temp_bytes(lambda h, w, b: kernels.poly_norm(h, w, b, EPS, impl="xla"))
  assert fused <= 0.7 * autodiff, (fused, autodiff)


# ---- the benchmark cannot rot --------------------------------------------------------------------

def test_benchmark_runs_on_a_tiny_shape(tmp_path):
  from benchmarks import bench_kernels
  out = tmp_path / "results.md"
  table = bench_kernels.main(["--shapes", "8x128", "--runs", "1", "--out", str(out)])
  assert table.count("| polynorm |") == 4 and table.count("| polyrelu |") == 4
  assert "### Kernels on cpu" in out.read_text() and table in out.read_text()
