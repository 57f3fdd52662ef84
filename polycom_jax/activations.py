"""PolyCom activations (PolyNorm, PolyReLU), the baselines they are compared with, a registry.

The math (shared/DESIGN.md), per row over the LAST axis, with N(v) = v / sqrt(mean(v**2) + eps):
  poly_norm(x) = sum_{i=1..r} weight[r-i] * N(x**i) + bias      (weight[0]: highest power)
  poly_relu(x) = sum_{i=1..r} weight[r-i] * relu(x)**i + bias

Numerics: the row statistics are computed in float32 whatever the input dtype (the paper's
PyTorch code computes them in the activation dtype, bf16 under mixed precision; f32 differs from
it at about bf16 resolution and is more accurate), and the result is cast back to the input dtype.
To keep x**(2r) finite for large inputs, each row is first divided by its largest magnitude s:
N(x**p) = z**p / sqrt(mean(z**(2p)) + eps / s**(2p)) with z = x / s, which is the same value
(s cancels exactly), so s needs no gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from polycom_jax.config_errors import ConfigError

IMPLS = ("auto", "xla", "pallas")
# exp() of this stays finite in float32: bounds eps / s**(2p) for rows of tiny magnitude.
_MAX_LOG_EPS = 80.0


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
    eps_p = jnp.exp(jnp.minimum(log_eps - 2 * p * log_s, _MAX_LOG_EPS))  # eps / s**(2p)
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
              impl: str = "auto") -> jax.Array:
  """PolyNorm over the last axis of x (any leading shape); weight [r], bias [1]."""
  from polycom_jax import kernels  # kernels import this module's references
  return kernels.poly_norm(x, weight, bias, eps, impl=resolve_impl(impl))


def poly_relu(x: jax.Array, weight: jax.Array, bias: jax.Array, *,
              impl: str = "auto") -> jax.Array:
  """PolyReLU, elementwise; weight [r], bias [1]."""
  from polycom_jax import kernels
  return kernels.poly_relu(x, weight, bias, impl=resolve_impl(impl))


class _PolyCom(nnx.Module):
  """Shared parameters of the PolyCom modules: weight [r] = 1/r, bias [1] = 0, float32."""

  def __init__(self, order: int = 3, *, impl: str = "auto"):
    if order < 1:
      raise ConfigError(f"PolyCom order must be >= 1, got {order}")
    resolve_impl(impl)
    self.order, self.impl = order, impl
    self.weight = nnx.Param(jnp.full((order,), 1.0 / order, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((1,), jnp.float32))


class PolyNorm(_PolyCom):
  """PolyNorm(x) = sum_i weight[r-i] * N(x**i) + bias, normalised over the last axis."""

  def __init__(self, order: int = 3, eps: float = 1e-6, *, impl: str = "auto"):
    super().__init__(order, impl=impl)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return poly_norm(x, self.weight[...], self.bias[...], self.eps, impl=self.impl)


class PolyReLU(_PolyCom):
  """PolyReLU(x) = sum_i weight[r-i] * relu(x)**i + bias."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return poly_relu(x, self.weight[...], self.bias[...], impl=self.impl)


def relu2(x: jax.Array) -> jax.Array:
  """Squared ReLU (Primer)."""
  return jnp.square(jax.nn.relu(x))


def gelu(x: jax.Array) -> jax.Array:
  """GELU in its exact erf form."""
  return jax.nn.gelu(x, approximate=False)


@dataclasses.dataclass(frozen=True)
class Activation:
  """An MLP activation by name: a stateless function or a module class with parameters.

  gated: the MLP is W_down(fn(W_gate x) * W_up x) instead of W_down(fn(W_up x)).
  """
  name: str
  gated: bool = False
  fn: Callable[[jax.Array], jax.Array] | None = None
  module: type[_PolyCom] | None = None

  @property
  def has_params(self) -> bool:
    return self.module is not None

  def make(self, *, order: int = 3, eps: float = 1e-6,
           impl: str = "auto") -> Callable[[jax.Array], jax.Array]:
    """The callable to use in an MLP: a fresh module (own parameters) or the plain function."""
    if self.module is PolyNorm:
      return PolyNorm(order, eps, impl=impl)
    if self.module is PolyReLU:
      return PolyReLU(order, impl=impl)
    return self.fn


REGISTRY: dict[str, Activation] = {a.name: a for a in (
    Activation("polynorm", module=PolyNorm),
    Activation("polyrelu", module=PolyReLU),
    Activation("relu", fn=jax.nn.relu),
    Activation("gelu", fn=gelu),
    Activation("relu2", fn=relu2),
    Activation("silu", fn=jax.nn.silu),
    Activation("swiglu", gated=True, fn=jax.nn.silu),
    Activation("geglu", gated=True, fn=gelu),
)}


def get(name: str) -> Activation:
  """The activation registered under name; an unknown name lists the known ones."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise ConfigError(f"config.model.activation: unknown activation {name!r}; "
                      f"known: {', '.join(REGISTRY)}") from None
