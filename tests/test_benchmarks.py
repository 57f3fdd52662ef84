"""The benchmarks run end to end on CPU (so they cannot rot between GPU sessions)."""

from benchmarks import bench_attention, bench_train_step


def test_train_step_benchmark_reports_every_field(tmp_path):
  out = tmp_path / "RESULTS.md"
  results = bench_train_step.main(["--steps=1", "--activations=polynorm,swiglu", "--no_sweep",
                                   f"--out={out}"])
  for r in results.values():
    assert r["step_ms"] > 0 and r["tokens_per_sec"] > 0 and r["compile_s"] > 0
  assert results["polynorm"]["params"] == results["swiglu"]["params"] + 8   # w[3] + b[1], 2 layers
  text = out.read_text()
  assert "| polynorm |" in text and "overhead over SwiGLU" in text


def test_benchmarks_import_without_the_data_stack():
  """The lent GPU machine has jax, flax and optax but not ml_collections, grain or tfds."""
  import os
  import subprocess
  import sys
  code = (
      "import builtins\n"
      "real = builtins.__import__\n"
      "def guard(name, *a, **k):\n"
      "  if name.split('.')[0] in ('ml_collections', 'grain', 'tensorflow_datasets'):\n"
      "    raise ImportError('not on the GPU machine: ' + name)\n"
      "  return real(name, *a, **k)\n"
      "builtins.__import__ = guard\n"
      "import benchmarks.bench_train_step, benchmarks.bench_kernels\n"
      "import benchmarks.bench_attention, benchmarks.gpu_suite\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr


def test_attention_benchmark_reports_every_backend_of_the_platform(tmp_path):
  out = tmp_path / "RESULTS.md"
  text = bench_attention.main(["--seqs=128", "--batch=1", "--heads=2", "--kv_heads=1",
                               "--head_dim=16", "--docs=3", "--runs=1", f"--out={out}"])
  rows = [l for l in text.splitlines() if l.startswith("| 128 |")]
  assert len(rows) == 2 and all("| xla |" in r and "failed" not in r for r in rows), text
  assert "### Attention backends" in out.read_text()
