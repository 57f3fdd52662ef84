"""MFU's peak FLOP/s table: the exact device kind first, else the longest listed prefix."""

import pytest

from polycom_jax import metrics


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),       # SXM
    ("NVIDIA H100 PCIe", 756e12),            # not the SXM card's 989
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v5 lite", 197e12),                 # not v5p's 459
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("cpu", None),
])
def test_peak_flops_by_device_kind(kind, peak):
  assert metrics.peak_flops(kind) == peak


def test_mfu_is_none_without_a_known_peak():
  assert metrics.mfu(6e9, 1e4, 1, "cpu") is None
  assert metrics.mfu(6e9, 1e4, 2, "TPU v4") == pytest.approx(6e9 * 1e4 / (2 * 275e12))
