"""Times PolyNorm / PolyReLU forward and forward+backward: jnp autodiff of the reference formula,
the custom-VJP jnp path ("xla") and the Pallas kernel (GPU/TPU only; skipped on CPU).

  python -m benchmarks.bench_kernels [--shapes 16384x8192,65536x1536] [--dtype bf16]
                                     [--runs 20] [--out benchmarks/RESULTS.md]

GB/s counts the bytes that must move: forward reads x and writes y; forward+backward also reads x
and dy and writes dx (5 arrays of x's size). "% copy" compares with a jitted x + 1 of the same
size (2 arrays). Needs only jax, numpy and this project.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from polycom_jax import activations, kernels

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}
ACCEL_SHAPES = "16384x8192,16384x8256,65536x1536,2048x32768"
CPU_SHAPES = "1024x1536,256x8192"
EPS = 1e-6


def _paths(kernel: str, on_cpu: bool) -> dict:
  """name -> activation function (x, weight, bias) -> y."""
  if kernel == "polynorm":
    paths = {"jnp autodiff": lambda x, w, b: activations.poly_norm_reference(x, w, b, EPS),
             "xla custom-vjp": lambda x, w, b: kernels.poly_norm(x, w, b, EPS, impl="xla"),
             "pallas": lambda x, w, b: kernels.poly_norm(x, w, b, EPS, impl="pallas")}
  else:
    paths = {"jnp autodiff": activations.poly_relu_reference,
             "xla custom-vjp": lambda x, w, b: kernels.poly_relu(x, w, b, impl="xla"),
             "pallas": lambda x, w, b: kernels.poly_relu(x, w, b, impl="pallas")}
  if on_cpu:
    del paths["pallas"]  # interpret mode times the interpreter, not a kernel
  return paths


def median_seconds(fn, args, runs: int) -> float:
  """Median wall time of fn(*args) over runs calls, after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _fwd_bwd(act):
  def step(x, w, b, dy):
    y, vjp = jax.vjp(act, x, w, b)
    return (y, *vjp(dy))
  return step


def bench_shape(rows: int, d: int, dtype, order: int, runs: int) -> list[tuple]:
  """Rows of the results table for one [rows, d] shape."""
  kx, kd = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (rows, d), dtype)
  dy = jax.random.normal(kd, (rows, d), dtype)
  w = jnp.full((order,), 1.0 / order, jnp.float32)
  b = jnp.zeros((1,), jnp.float32)
  nbytes = x.size * x.dtype.itemsize
  copy_s = median_seconds(jax.jit(lambda a: a + jnp.asarray(1, a.dtype)), (x,), runs)
  copy_gbs = 2 * nbytes / copy_s / 1e9
  out = [("copy (x + 1)", "", f"{rows}x{d}", "-", copy_s, copy_gbs, 100.0, None)]
  on_cpu = jax.default_backend() == "cpu"
  for kernel in ("polynorm", "polyrelu"):
    base = {}
    for name, act in _paths(kernel, on_cpu).items():
      for label, fn, args, moved in (("fwd", jax.jit(act), (x, w, b), 2),
                                     ("fwd+bwd", jax.jit(_fwd_bwd(act)), (x, w, b, dy), 5)):
        secs = median_seconds(fn, args, runs)
        base.setdefault(label, secs)
        gbs = moved * nbytes / secs / 1e9
        out.append((kernel, name, f"{rows}x{d}", label, secs, gbs, 100 * gbs / copy_gbs,
                    base[label] / secs))
  return out


def to_markdown(rows: list[tuple], dtype_name: str) -> str:
  lines = ["| kernel | path | shape | pass | time (ms) | GB/s | % copy BW | speedup vs autodiff |",
           "|---|---|---|---|---|---|---|---|"]
  for kernel, path, shape, label, secs, gbs, pct, speedup in rows:
    lines.append(f"| {kernel} | {path} | {shape} {dtype_name} | {label} | {secs * 1e3:.3f} | "
                 f"{gbs:.1f} | {pct:.0f}% | {'' if speedup is None else f'{speedup:.2f}x'} |")
  return "\n".join(lines)


def main(argv: list[str]) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", help="comma-separated ROWSxD; default: "
                      f"{ACCEL_SHAPES} on GPU/TPU, {CPU_SHAPES} on CPU")
  parser.add_argument("--dtype", choices=DTYPES, default="bf16")
  parser.add_argument("--order", type=int, default=3)
  parser.add_argument("--runs", type=int, default=10, help="timed runs per case (median)")
  parser.add_argument("--out", help="append the table, command, machine and date to this file")
  args = parser.parse_args(argv)
  shapes = args.shapes or (CPU_SHAPES if jax.default_backend() == "cpu" else ACCEL_SHAPES)
  results = []
  for shape in shapes.split(","):
    rows, d = (int(v) for v in shape.lower().split("x"))
    results += bench_shape(rows, d, DTYPES[args.dtype], args.order, args.runs)
  table = to_markdown(results, args.dtype)
  print(table)
  if args.out:
    device = jax.devices()[0]
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(f"\n### Kernels on {device.device_kind} ({device.platform}), jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}\n"
              f"`python -m benchmarks.bench_kernels {' '.join(argv)}`\n\n{table}\n")
  return table


if __name__ == "__main__":
  main(sys.argv[1:])
