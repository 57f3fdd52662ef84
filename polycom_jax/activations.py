"""PolyCom activations (PolyNorm, PolyReLU), the baselines they are compared with, a registry.

The math (shared/DESIGN.md), per row over the LAST axis, with N(v) = v / sqrt(mean(v**2) + eps):
  poly_norm(x) = sum_{i=1..r} weight[r-i] * N(x**i) + bias      (weight[0]: highest power)
  poly_relu(x) = sum_{i=1..r} weight[r-i] * relu(x)**i + bias

Gated forms (`polynorm_glu`, `polyrelu_glu`): the activation is the gate of a GLU,
W_down(poly(W_gate x) * W_up x), as Motif's models use PolyNorm (`hidden_act: "poly_norm"`); one
set of coefficients per MLP, and 2/3 of the ungated width so they match SwiGLU's parameters.

Numerics: the row statistics are computed in float32 whatever the input dtype (the paper's
PyTorch code computes them in the activation dtype, bf16 under mixed precision; f32 differs from
it at about bf16 resolution and is more accurate), and the result is cast back to the input dtype.
To keep x**(2r) finite for large inputs, each row is first divided by its largest magnitude s:
N(x**p) = z**p / sqrt(mean(z**(2p)) + eps / s**(2p)) with z = x / s, which is the same value
(s cancels exactly), so s needs no gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from polycom_jax import kernels
from polycom_jax import sharding
from polycom_jax.config_errors import ConfigError
from polycom_jax.kernels.polynorm import MAX_LOG_EPS

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
  """Maps "auto" to the backend's best path: the Pallas kernel on GPU/TPU, jnp on CPU."""
  if impl not in IMPLS:
    raise ConfigError(f"activation impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "xla" if jax.default_backend() == "cpu" else "pallas"
  return impl


def _row_scale(x32: jax.Array) -> jax.Array:
  """Largest |x| per row ([..., 1]), 1 for all-zero rows; a constant for autodiff."""
  s = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  s = jnp.where((s > 0) & jnp.isfinite(s), s, 1.0)
  return jax.lax.stop_gradient(s)


def poly_norm_reference(x: jax.Array, weight: jax.Array, bias: jax.Array,
                        eps: float = 1e-6) -> jax.Array:
  """PolyNorm in plain jnp, differentiated by autodiff: the baseline every fused path must equal."""
  order = weight.shape[0]
  x32 = x.astype(jnp.float32)
  w32 = weight.astype(jnp.float32)
  s = _row_scale(x32)                           # [..., 1]
  z = x32 / s                                   # [..., D], |z| <= 1
  log_eps, log_s = jnp.log(jnp.float32(eps)), jnp.log(s)
  y = jnp.zeros_like(z) + bias.astype(jnp.float32)
  zp = jnp.ones_like(z)
  for p in range(1, order + 1):
    zp = zp * z                                 # (x / s)**p
    eps_p = jnp.exp(jnp.minimum(log_eps - 2 * p * log_s, MAX_LOG_EPS))  # eps / s**(2p)
    inv_rms = jax.lax.rsqrt(jnp.mean(zp * zp, axis=-1, keepdims=True) + eps_p)
    y = y + w32[order - p] * zp * inv_rms
  return y.astype(x.dtype)


def poly_relu_reference(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
  """PolyReLU in plain jnp (Horner form), in float32, cast back to the input dtype."""
  z = jax.nn.relu(x.astype(jnp.float32))
  w32 = weight.astype(jnp.float32)
  y = jnp.zeros_like(z)
  for i in range(weight.shape[0]):              # ((w0 z + w1) z + w2) z
    y = (y + w32[i]) * z
  return (y + bias.astype(jnp.float32)).astype(x.dtype)


def poly_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = 1e-6, *,
              impl: str = "auto", logical_axes: Sequence[str | None] | None = None) -> jax.Array:
  """PolyNorm over the last axis of x (any leading shape); weight [r], bias [1].

  logical_axes: x's logical axis names; under a multi-device mesh they let the fused kernel
  run per shard (see `_fused_or_jnp`)."""
  return _fused_or_jnp(kernels.poly_norm, kernels.poly_norm_sharded, x, weight, bias, impl,
                       logical_axes, eps=eps)


def poly_relu(x: jax.Array, weight: jax.Array, bias: jax.Array, *, impl: str = "auto",
              logical_axes: Sequence[str | None] | None = None) -> jax.Array:
  """PolyReLU, elementwise; weight [r], bias [1]; logical_axes as in poly_norm."""
  return _fused_or_jnp(kernels.poly_relu, kernels.poly_relu_sharded, x, weight, bias, impl,
                       logical_axes)


def _fused_or_jnp(plain, sharded, x, weight, bias, impl, logical_axes, **kwargs):
  """The one place that decides how a PolyCom activation runs:
  - "xla" (jnp with a custom VJP): as it is; under a mesh GSPMD partitions it;
  - "pallas" on one device, or in a shard_map body (sharding.per_shard): the kernel as it is;
  - "pallas" under a multi-device mesh: XLA cannot partition a Pallas call, so the kernel runs
    per shard in shard_map on the layout that x's logical axis names give (PolyNorm's row sums
    psum'd over the axes that split the last dimension); without names, the jnp path."""
  impl = resolve_impl(impl)
  if impl == "pallas" and sharding.active_mesh() is not None:
    layout = sharding.active_layout(logical_axes) if logical_axes is not None else None
    if layout is None:
      impl = "xla"
    else:
      mesh, spec = layout
      return sharded(x, weight, bias, impl=impl, mesh=mesh, x_spec=spec, **kwargs)
  return plain(x, weight, bias, impl=impl, **kwargs)


class _PolyCom(nnx.Module):
  """Shared parameters of the PolyCom modules: weight [r] = 1/r, bias [1] = 0, float32."""

  def __init__(self, order: int = 3, *, impl: str = "auto",
               logical_axes: Sequence[str | None] | None = None):
    if order < 1:
      raise ConfigError(f"PolyCom order must be >= 1, got {order}")
    resolve_impl(impl)
    self.order, self.impl = order, impl
    self.logical_axes = None if logical_axes is None else tuple(logical_axes)
    # param_kind "activation": no weight decay under any rule (optimizer.decay_mask).
    self.weight = nnx.Param(jnp.full((order,), 1.0 / order, jnp.float32), param_kind="activation")
    self.bias = nnx.Param(jnp.zeros((1,), jnp.float32), param_kind="activation")


class PolyNorm(_PolyCom):
  """PolyNorm(x) = sum_i weight[r-i] * N(x**i) + bias, normalised over the last axis."""

  def __init__(self, order: int = 3, eps: float = 1e-6, *, impl: str = "auto",
               logical_axes: Sequence[str | None] | None = None):
    super().__init__(order, impl=impl, logical_axes=logical_axes)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return poly_norm(x, self.weight[...], self.bias[...], self.eps, impl=self.impl,
                     logical_axes=self.logical_axes)


class PolyReLU(_PolyCom):
  """PolyReLU(x) = sum_i weight[r-i] * relu(x)**i + bias."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return poly_relu(x, self.weight[...], self.bias[...], impl=self.impl,
                     logical_axes=self.logical_axes)


def relu2(x: jax.Array) -> jax.Array:
  """Squared ReLU (Primer)."""
  return jnp.square(jax.nn.relu(x))


def gelu(x: jax.Array) -> jax.Array:
  """GELU in its exact erf form."""
  return jax.nn.gelu(x, approximate=False)


@dataclasses.dataclass(frozen=True)
class Activation:
  """An MLP activation by name: a stateless function, or a PolyCom module class with parameters
  and its pure function of (x, weight, bias).

  gated: the MLP is W_down(fn(W_gate x) * W_up x) instead of W_down(fn(W_up x)).
  """
  name: str
  gated: bool = False
  fn: Callable[..., jax.Array] | None = None
  module: type[_PolyCom] | None = None

  @property
  def has_params(self) -> bool:
    return self.module is not None

  def make(self, *, order: int = 3, eps: float = 1e-6, impl: str = "auto",
           logical_axes: Sequence[str | None] | None = None) -> Callable[[jax.Array], jax.Array]:
    """The callable to use in an MLP: a fresh module (own parameters) or the plain function.
    logical_axes: the input's logical axis names (for the fused kernel under a mesh)."""
    if self.module is PolyNorm:
      return PolyNorm(order, eps, impl=impl, logical_axes=logical_axes)
    if self.module is PolyReLU:
      return PolyReLU(order, impl=impl, logical_axes=logical_axes)
    return self.fn

  def apply(self, x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None,
            groups: jax.Array | None = None, *, impl: str = "auto") -> jax.Array:
    """The activation on rows x [R, F] with its coefficients passed in (the MoE layer's case):
    weight [G, r] and bias [G, 1], G = 1 (shared) or one set per group, row i using set
    groups[i] (an expert index). Plain activations ignore the coefficients."""
    if not self.has_params:
      return self.fn(x)
    if weight.shape[0] == 1:
      return self.fn(x, weight[0], bias[0], impl=impl)
    # Per group: PolyCom is linear in its coefficients, so y = b + sum_i w[i] * (the activation
    # with weight e_i), each term one call of the shared-coefficient function.
    wr, br = weight[groups], bias[groups]                                # [R, r], [R, 1]
    r, zero = weight.shape[-1], jnp.zeros((1,), jnp.float32)
    y = br.astype(x.dtype)
    for i in range(r):
      unit = jnp.zeros((r,), jnp.float32).at[i].set(1.0)
      y = y + wr[:, i:i + 1].astype(x.dtype) * self.fn(x, unit, zero, impl=impl)
    return y


REGISTRY: dict[str, Activation] = {a.name: a for a in (
    Activation("polynorm", fn=poly_norm, module=PolyNorm),
    Activation("polyrelu", fn=poly_relu, module=PolyReLU),
    Activation("relu", fn=jax.nn.relu),
    Activation("gelu", fn=gelu),
    Activation("relu2", fn=relu2),
    Activation("silu", fn=jax.nn.silu),
    Activation("swiglu", gated=True, fn=jax.nn.silu),
    Activation("geglu", gated=True, fn=gelu),
    Activation("polynorm_glu", gated=True, fn=poly_norm, module=PolyNorm),
    Activation("polyrelu_glu", gated=True, fn=poly_relu, module=PolyReLU),
)}


def get(name: str) -> Activation:
  """The activation registered under name; an unknown name lists the known ones."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ConfigError(f"config.model.activation: unknown activation {name!r}; "
                      f"known: {', '.join(REGISTRY)}") from None
