"""Attention backends, forward + backward: time, memory and agreement with the XLA path.

  python -m benchmarks.bench_attention [--seqs=1024,2048,4096,8192] [--batch=2] [--out=FILE]

For each sequence length and backend (this project's attention.attend: xla, cudnn, splash, as
the platform allows; and jax's Pallas GPU flash attention, `pallas_gpu`, on GPUs) it compiles
value_and_grad of sum(attend(q, k, v) * cotangent) at the paper's head shape (16 heads of 128,
bfloat16), with and without packed documents (segment ids), reports the median step time,
the compiled step's memory and the largest difference from the XLA path's output and
gradients. Imports only jax, numpy and the project (runs on a bare GPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_kernels import median_seconds
from polycom_jax import attention


def _backends() -> list[str]:
  platform = jax.default_backend()
  if platform == "gpu":
    return ["xla", "cudnn", "pallas_gpu"]
  if platform == "tpu":
    return ["xla", "splash"]
  return ["xla"]


def _pallas_gpu(q, k, v, segment_ids):
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  h = q.shape[2]
  k, v = (jnp.repeat(x, h // x.shape[2], axis=2) for x in (k, v))
  return gpu_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / np.sqrt(q.shape[-1]),
                           causal=True)


def attend_fn(backend: str):
  if backend == "pallas_gpu":
    return _pallas_gpu
  return lambda q, k, v, seg: attention.attend(q, k, v, seg, impl=backend)


def segments(batch: int, seq: int, docs: int) -> jax.Array:
  """`docs` documents of uneven lengths per row, then 7% padding."""
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(batch):
    body = int(seq * 0.93)
    cuts = np.sort(rng.choice(np.arange(1, body), docs - 1, replace=False))
    ids = np.zeros(seq, np.int32)
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, body])):
      ids[lo:hi] = i + 1
    rows.append(ids)
  return jnp.asarray(np.stack(rows))


def measure(backend: str, q, k, v, seg, cotangent, runs: int, reference=None) -> dict:
  fn = attend_fn(backend)
  grad = jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * cotangent),
      argnums=(0, 1, 2)))
  out_fn = jax.jit(lambda q, k, v: fn(q, k, v, seg))
  compiled = grad.lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  peak = None if mem is None else (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20
  result = {"fwd_ms": 1e3 * median_seconds(out_fn, (q, k, v), runs),
            "fwd_bwd_ms": 1e3 * median_seconds(compiled, (q, k, v), runs), "temp_mib": peak,
            "out": out_fn(q, k, v), "grads": compiled(q, k, v)[1]}
  if reference is not None:
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    result["out_err"] = err(result["out"], reference["out"])
    result["grad_err"] = max(err(a, b) for a, b in zip(result["grads"], reference["grads"]))
  return result


def main(argv: list[str]) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seqs", default=None, help="default 1024,2048,4096,8192 (CPU: 256,512)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--docs", type=int, default=9, help="documents per row (packed case)")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--out", help="append the table, command, machine and date to this file")
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  seqs = [int(s) for s in (args.seqs or ("256,512" if on_cpu else "1024,2048,4096,8192"))
          .split(",")]
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  device = jax.devices()[0]
  lines = [f"`python -m benchmarks.bench_attention {' '.join(argv)}` ({device.device_kind}, "
           f"jax {jax.__version__}, {datetime.date.today()}; batch {args.batch}, {args.heads} "
           f"heads ({args.kv_heads} kv) of {args.head_dim}, {jnp.dtype(dtype).name}, median of "
           f"{args.runs}; error: max |difference| from the xla backend)", "",
           "| seq | documents | backend | fwd (ms) | fwd+bwd (ms) | fwd+bwd temp (MiB) | "
           "out error | grad error |", "|---:|---|---|---:|---:|---:|---:|---:|"]
  for seq in seqs:
    key = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(key[0], (args.batch, seq, args.heads, args.head_dim), dtype)
    k, v = (jax.random.normal(kk, (args.batch, seq, args.kv_heads, args.head_dim), dtype)
            for kk in key[1:3])
    cotangent = jax.random.normal(key[3], q.shape, jnp.float32)
    for seg, label in ((None, "1 (causal)"), (segments(args.batch, seq, args.docs),
                                              f"{args.docs} + padding")):
      reference = None
      for backend in _backends():
        try:
          r = measure(backend, q, k, v, seg, cotangent, args.runs, reference)
        except Exception as e:  # noqa: BLE001 - report a backend that cannot serve, go on
          lines.append(f"| {seq} | {label} | {backend} | failed: "
                       f"{type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | |")
          print(lines[-1], flush=True)
          continue
        if reference is None:
          reference = r
        fmt = lambda x, spec: "-" if x is None else format(x, spec)
        lines.append(f"| {seq} | {label} | {backend} | {r['fwd_ms']:.2f} | "
                     f"{r['fwd_bwd_ms']:.2f} | {fmt(r['temp_mib'], '.0f')} | "
                     f"{fmt(r.get('out_err'), '.2e')} | {fmt(r.get('grad_err'), '.2e')} |")
        print(lines[-1], flush=True)
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(f"\n### Attention backends\n\n{text}\n")
  return text


if __name__ == "__main__":
  main(sys.argv[1:])
