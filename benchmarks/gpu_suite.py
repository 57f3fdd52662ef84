"""The one command to run on a lent GPU: correctness checks, then the benchmarks, one report.

  python -m benchmarks.gpu_suite [--out=DIR]      # DIR defaults to $OUT, else the current dir

Needs jax with CUDA, flax, optax and numpy only (no network, no grain / tfds / ml-collections).
In order, each part timed and guarded (a failing part is reported, the rest still runs):
  1. checks: the fused PolyNorm / PolyReLU kernels (Triton) against the jnp path, forward and
     backward, odd shapes, float32 and bfloat16; the attention backends (cuDNN, jax's Pallas GPU
     flash attention) against XLA, causal and with packed documents; and a whole model's loss
     and gradients with document masking on cuDNN against XLA, which must also differ from the
     loss without the mask (the MaxText bug: a cuDNN path that ignored packed segments);
  2. benchmarks.bench_kernels (bf16);
  3. benchmarks.bench_attention (seq 1k-8k, fwd+bwd, with and without documents);
  4. benchmarks.bench_train_step --preset=gpu (the 1B shape at 4 layers, per activation, no
     sweeps).
Writes DIR/gpu_suite.md (the tables, then paste them into benchmarks/RESULTS.md) and
DIR/gpu_suite.json (the check results). Sized for about 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import bench_attention, bench_kernels, bench_train_step
from polycom_jax import activations, attention
from polycom_jax import model as model_lib


def _max_err(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def _max_rel_err(got, want) -> float:
  """The largest |difference| of two pytrees of gradients, each over its reference's scale."""
  return max(_max_err(a, c) / (float(jnp.max(jnp.abs(c))) + 1e-30)
             for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def check_kernels() -> list[dict]:
  """Fused vs jnp, value and gradients, on odd shapes; tolerance by dtype."""
  results = []
  rng = np.random.default_rng(0)
  for name, fn in (("poly_norm", activations.poly_norm), ("poly_relu", activations.poly_relu)):
    for rows, d in ((37, 1000), (4099, 5504), (3, 130)):
      for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
        x = jnp.asarray(rng.normal(size=(rows, d)), dtype)
        w = jnp.asarray(rng.normal(size=(3,)) * 0.5, jnp.float32)
        b = jnp.asarray(rng.normal(size=(1,)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(rows, d)), dtype)

        def loss(impl):
          return jax.jit(jax.value_and_grad(
              lambda x, w, b: jnp.sum(fn(x, w, b, impl=impl).astype(jnp.float32) * dy),
              argnums=(0, 1, 2)))
        (v_p, g_p), (v_x, g_x) = loss("pallas")(x, w, b), loss("xla")(x, w, b)
        out_err = _max_err(fn(x, w, b, impl="pallas"), fn(x, w, b, impl="xla"))
        grad_err = _max_rel_err(g_p, g_x)
        results.append({"check": f"{name} {rows}x{d} {jnp.dtype(dtype).name}",
                        "out_err": out_err, "grad_rel_err": grad_err,
                        "ok": out_err <= tol * 10 and grad_err <= tol})
  return results


def check_attention() -> list[dict]:
  results = []
  key = jax.random.split(jax.random.key(0), 4)
  b, t, h, kh, d = 2, 1024, 8, 4, 128
  q = jax.random.normal(key[0], (b, t, h, d), jnp.bfloat16)
  k, v = (jax.random.normal(kk, (b, t, kh, d), jnp.bfloat16) for kk in key[1:3])
  cot = jax.random.normal(key[3], q.shape, jnp.float32)
  packed = bench_attention.segments(b, t, 7)
  for seg, label in ((None, "causal"), (packed, "7 documents + padding")):
    def weighted_grads(fn):
      return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * cot),
                              (0, 1, 2)))(q, k, v)
    xla = bench_attention.attend_fn("xla")
    ref_out, ref_grads = jax.jit(lambda q, k, v: xla(q, k, v, seg))(q, k, v), weighted_grads(xla)
    for backend in ("cudnn", "pallas_gpu"):
      fn = bench_attention.attend_fn(backend)
      try:
        out_err = _max_err(jax.jit(lambda q, k, v: fn(q, k, v, seg))(q, k, v), ref_out)
        grad_err = _max_rel_err(weighted_grads(fn), ref_grads)
        results.append({"check": f"attention {backend} vs xla, {label}", "out_err": out_err,
                        "grad_rel_err": grad_err, "ok": out_err < 5e-2 and grad_err < 5e-2})
      except Exception as e:  # noqa: BLE001
        results.append({"check": f"attention {backend}, {label}", "ok": False,
                        "error": f"{type(e).__name__}: {str(e)[:300]}"})
  return results


def check_model_packed() -> list[dict]:
  """A 2-layer model's loss and gradients with packed documents: cuDNN == XLA, and both differ
  from the unmasked loss (so a backend that ignored the segments would fail)."""
  base = dict(vocab_size=512, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=0, ungated_d_ff=1024, d_ff=0, max_seq_len=1024, dtype="bfloat16",
              activation="polynorm")
  b, t = 2, 1024
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 512)
  seg = bench_attention.segments(b, t, 9)
  positions = jnp.asarray(np.stack([np.concatenate([np.arange(n) for n in
                                    np.unique(row, return_counts=True)[1]]) for row in
                                    np.asarray(seg)]))

  def loss_and_grads(impl, doc):
    mc = model_lib.ModelConfig.from_config(dict(base, attention_impl=impl, document_mask=doc))
    graphdef, params = nnx.split(model_lib.Transformer(mc, nnx.Rngs(0)), nnx.Param)

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens, positions=positions, segment_ids=seg)
      nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
          logits, jnp.roll(tokens, -1, 1)[..., None], -1)[..., 0]
      return jnp.mean(nll)
    return jax.jit(jax.value_and_grad(loss))(params)

  out = []
  try:
    (l_c, g_c), (l_x, g_x), (l_u, _) = (loss_and_grads("cudnn", True),
                                        loss_and_grads("xla", True),
                                        loss_and_grads("xla", False))
    grad_err = _max_rel_err(g_c, g_x)
    out.append({"check": "model loss, packed documents, cudnn vs xla",
                "loss_cudnn": float(l_c), "loss_xla": float(l_x), "loss_unmasked": float(l_u),
                "grad_rel_err": grad_err,
                "ok": abs(float(l_c) - float(l_x)) < 1e-2 and grad_err < 5e-2
                      and abs(float(l_x) - float(l_u)) > 10 * abs(float(l_c) - float(l_x))})
  except Exception as e:  # noqa: BLE001
    out.append({"check": "model loss, packed documents, cudnn vs xla", "ok": False,
                "error": f"{type(e).__name__}: {str(e)[:300]}"})
  return out


def _part(name, fn, log):
  """Runs one part, capturing its printout; a failure is recorded and the suite goes on."""
  t0 = time.perf_counter()
  buf = io.StringIO()
  try:
    with contextlib.redirect_stdout(buf):
      result = fn()
    status = "ok"
  except Exception:  # noqa: BLE001
    result, status = None, "FAILED:\n```\n" + traceback.format_exc()[-3000:] + "\n```"
  sys.stdout.write(buf.getvalue())
  log.append((name, time.perf_counter() - t0, status))
  return result


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  device = jax.devices()[0]
  log: list = []
  checks = []
  for name, fn in (("kernel checks", check_kernels), ("attention checks", check_attention),
                   ("packed-documents model check", check_model_packed)):
    checks += _part(name, fn, log) or [{"check": name, "ok": False, "error": "crashed"}]
  kernels = _part("bench_kernels", lambda: bench_kernels.main(["--dtype=bf16"]), log)
  attn = _part("bench_attention", lambda: bench_attention.main([]), log)
  train = _part("bench_train_step", lambda: bench_train_step.main(
      ["--preset=gpu", "--no_sweep", "--steps=10"]), log)
  lines = [f"## GPU suite: {device.device_kind}, jax {jax.__version__}, "
           f"{time.strftime('%Y-%m-%d')}", "", "`python -m benchmarks.gpu_suite`", "",
           "| part | seconds | status |", "|---|---:|---|"]
  lines += [f"| {n} | {s:.0f} | {st.splitlines()[0]} |" for n, s, st in log]
  lines += ["", "### Checks", "", "| check | result | details |", "|---|---|---|"]
  for c in checks:
    details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in c.items() if k not in ("check", "ok"))
    lines.append(f"| {c['check']} | {'pass' if c['ok'] else 'FAIL'} | {details} |")
  if kernels:
    lines += ["", "### Kernels (bf16)", "", kernels]
  if isinstance(attn, str):
    lines += ["", "### Attention backends", "", attn]
  if train:
    lines += ["", "### Train step (1B shape, 4 layers)", "",
              "| activation | step (ms) | tokens/s | MFU | peak (MiB) |",
              "|---|---:|---:|---:|---:|"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    for act, r in train.items():
      lines.append(f"| {act} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
                   f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_mib'], '.0f')} |")
  lines += [f"\n{n}: {st}" for n, _, st in log if st != "ok"]
  with open(os.path.join(args.out, "gpu_suite.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(args.out, "gpu_suite.json"), "w", encoding="utf-8") as f:
    json.dump({"checks": checks, "parts": log}, f, indent=1, default=str)
  print("\n".join(lines))
  return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
