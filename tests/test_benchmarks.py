"""The train-step benchmark runs end to end on CPU (so it cannot rot between GPU sessions)."""

from benchmarks import bench_train_step


def test_train_step_benchmark_reports_every_field(tmp_path):
  out = tmp_path / "RESULTS.md"
  results = bench_train_step.main(["--steps=1", "--activations=polynorm,swiglu", "--no_sweep",
                                   f"--out={out}"])
  for r in results.values():
    assert r["step_ms"] > 0 and r["tokens_per_sec"] > 0 and r["compile_s"] > 0
  assert results["polynorm"]["params"] == results["swiglu"]["params"] + 8   # w[3] + b[1], 2 layers
  text = out.read_text()
  assert "| polynorm |" in text and "overhead over SwiGLU" in text
