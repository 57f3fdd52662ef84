"""Expert parallelism (moe_impl="dispatch") on 8 fake devices against one device, and the
grouped matmuls (megablox, interpreted) against ragged_dot.

The multi-device part runs tests/moe_dispatch_worker.py in one subprocess (XLA_FLAGS must be
set before jax starts)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polycom_jax import grouped_matmul

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import moe_dispatch_worker as worker  # noqa: E402
from conftest import xla_flags

DROPLESS = [c for c, (_, factor, _) in worker.CASES.items() if factor > 1]


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
  out = tmp_path_factory.mktemp("moe_dispatch")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "moe_dispatch_worker.py"),
                         str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return dict(np.load(out / "arrays.npz"))


@pytest.mark.parametrize("router", worker.ROUTERS)
@pytest.mark.parametrize("case", DROPLESS)
def test_dispatch_equals_one_device(arrays, router, case):
  """Outputs, both router losses and every gradient (router, experts, coefficients, input),
  with random routing, all-tied router logits, and every token sent to experts 0 and 1 (one
  device of the expert4 mesh, two of expert8); nothing dropped."""
  ref = f"{router}/single{'_per_expert' if 'per_expert' in case else ''}/"
  prefix = f"{router}/{case}/"
  names = [k[len(prefix):] for k in arrays if k.startswith(prefix)]
  assert {"y", "grad/x", "grad/router", "grad/w_up", "grad/w_down"} <= set(names), names
  assert arrays[prefix + "loss/dropped"] == 0
  for name in names:
    if name == "loss/dropped":
      continue
    want, got = arrays[ref + name], arrays[prefix + name]
    scale = float(np.max(np.abs(want)))
    assert scale > 0, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale, err_msg=name)


def test_a_full_destination_drops_assignments_and_says_how_many(arrays):
  """expert8 at capacity_factor 1: each device's 12 assignments have 12 / 8 -> 2 slots per
  destination. Every token goes to experts 0 and 1 (devices 0 and 1), so each device keeps its
  first 2 tokens for each and drops the other 8 of 12 assignments: those tokens' outputs are 0,
  the first two tokens' are exact."""
  case, ref = "one_device/expert8_capacity1/", "one_device/single/"
  assert arrays[case + "loss/dropped"] == pytest.approx(8 / 12)
  y, want = arrays[case + "y"], arrays[ref + "y"]              # [8 rows (one per device), 6, D]
  np.testing.assert_allclose(y[:, :2], want[:, :2], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[:, 2:], 0)
  assert arrays["random/expert8_capacity1/loss/dropped"] > 0
  # The router losses do not depend on what the buffers dropped.
  for name in ("loss/load_balance", "loss/router_z"):
    np.testing.assert_allclose(arrays[case + name], arrays[ref + name], rtol=1e-6)


@pytest.mark.parametrize("sizes", [(7, 0, 13, 1, 10), (0, 0, 37, 0, 0), (1, 1, 1, 1, 1)],
                         ids=["odd_with_empty", "one_group", "tiny_groups"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_megablox_equals_ragged_dot_forward_and_backward(sizes, dtype):
  """gmm (forward, input gradient) and tgmm (weight gradient), interpreted, on 37 rows of
  which sum(sizes) are in groups: the same values and gradients as lax.ragged_dot, and zero
  output / no gradient for the rows after the last group."""
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (37, 24), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (5, 24, 40), jnp.float32).astype(dtype)
  cotangent = jax.random.normal(kc, (37, 40), jnp.float32)
  group_sizes = jnp.array(sizes, jnp.int32)

  def run(impl):
    f = lambda x, w: jnp.sum(grouped_matmul.grouped_matmul(x, w, group_sizes, impl)
                             .astype(jnp.float32) * cotangent)
    y = grouped_matmul.grouped_matmul(x, w, group_sizes, impl)
    return (y, *jax.grad(f, argnums=(0, 1))(x, w))

  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  used = sum(sizes)
  for name, got, want in zip(("y", "grad x", "grad w"), run("megablox"), run("ragged_dot")):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = float(np.max(np.abs(want))) or 1.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)
  y, gx, _ = run("megablox")
  assert not np.any(np.asarray(y[used:], np.float32)) and not np.any(np.asarray(gx[used:]))


def test_auto_is_megablox_on_tpu_only():
  assert grouped_matmul.resolve_impl("auto", "tpu") == "megablox"
  assert grouped_matmul.resolve_impl("auto", "gpu") == "ragged_dot"
  assert grouped_matmul.resolve_impl("auto", "cpu") == "ragged_dot"
