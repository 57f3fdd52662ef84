"""Train-step throughput per activation: step time, tokens/s, MFU, compile time, memory.

  python -m benchmarks.bench_train_step [--preset=cpu|gpu] [--steps=20] [--out=RESULTS.md]

For each activation it builds the model and a jitted train step (the model's loss and the
training optimizer, polycom_jax.optimizer) on a fixed random batch, times `--steps` steps after warm-up (median), and
reads the compiled step's memory analysis (peak device memory where the backend reports it).
Then it sweeps sequence length and d_model for PolyNorm and SwiGLU. Imports only jax, optax,
flax, numpy and the project, so it runs on the GPU machine without the data stack.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
from flax import nnx

from polycom_jax import metrics as metrics_lib
from polycom_jax import model as model_lib
from polycom_jax import optimizer as opt_lib

ACTIVATIONS = ("polynorm", "polyrelu", "swiglu", "gelu", "relu", "relu2")
PRESETS = {
    # d_model, layers, heads, ungated d_ff, seq, batch; sweeps of seq and d_model
    "cpu": dict(d_model=128, num_layers=2, num_heads=4, ungated_d_ff=576, seq=128, batch=8,
                seqs=(64, 128, 256), widths=(64, 128, 256)),
    # paper_dense_1b's shape, shortened to 4 layers so it fits one GPU with the optimizer.
    "gpu": dict(d_model=2048, num_layers=4, num_heads=16, ungated_d_ff=8256, seq=4096, batch=4,
                seqs=(1024, 2048, 4096), widths=(1024, 2048, 4096)),
}


def model_config(activation: str, d_model: int, num_layers: int, num_heads: int,
                 ungated_d_ff: int, seq: int, impl: str) -> model_lib.ModelConfig:
  m = dict(
      vocab_size=32000 if d_model >= 1024 else 512, d_model=d_model, num_layers=num_layers,
      num_heads=num_heads, num_kv_heads=num_heads, head_dim=0, activation=activation,
      activation_impl=impl, ungated_d_ff=ungated_d_ff, d_ff=0, d_ff_multiple_of=128,
      max_seq_len=seq, dtype="auto")
  return model_lib.ModelConfig.from_config(m)


def make_step(mc: model_lib.ModelConfig):
  """(state, jitted step) with AdamW, as in training (no data pipeline)."""
  train = types.SimpleNamespace(learning_rate=1e-4, min_learning_rate=1e-5, warmup_steps=10,
                                num_steps=1000, grad_clip=1.0, b1=0.9, b2=0.95, adam_eps=1e-8,
                                weight_decay=0.1, weight_decay_rule="megatron")
  tx = opt_lib.make_optimizer(train)
  model = model_lib.Transformer(mc, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def step(params, opt_state, tokens):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state, loss

  return params, tx.init(params), jax.jit(step, donate_argnums=(0, 1))


def measure(mc: model_lib.ModelConfig, batch: int, seq: int, steps: int) -> dict:
  params, opt_state, step = make_step(mc)
  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, mc.vocab_size)
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, tokens).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
  for _ in range(3):                                     # warm-up
    params, opt_state, loss = compiled(params, opt_state, tokens)
  jax.block_until_ready(loss)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, tokens)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tps = batch * seq / step_s
  mfu = metrics_lib.mfu(model_lib.flops_per_token(mc, seq), tps, 1, jax.devices()[0].device_kind)
  return {"params": model_lib.num_params(mc), "step_ms": 1e3 * step_s, "tokens_per_sec": tps,
          "mfu": mfu, "compile_s": compile_s, "peak_mib": None if peak is None else peak / 2**20}


def _fmt(v, spec):
  return "n/a" if v is None else format(v, spec)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                      help="default: gpu on a GPU, cpu otherwise")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--impl", default="auto", help="activation_impl: auto | xla | pallas")
  parser.add_argument("--activations", default=",".join(ACTIVATIONS))
  parser.add_argument("--no_sweep", action="store_true")
  parser.add_argument("--out", default=None, help="append the tables to this markdown file")
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset or ("cpu" if jax.default_backend() == "cpu" else "gpu")]
  p = dict(preset)
  seqs, widths = p.pop("seqs"), p.pop("widths")
  batch, seq = p.pop("batch"), p.pop("seq")
  device = jax.devices()[0].device_kind
  lines = [f"`python -m benchmarks.bench_train_step {' '.join(argv)}`",
           f"({device}, jax {jax.__version__}, {datetime.date.today()}; batch {batch} x seq {seq}, "
           f"{p['num_layers']} layers, d_model {p['d_model']}, median of {args.steps} steps)", "",
           "| activation | params | step (ms) | tokens/s | MFU | compile (s) | peak memory (MiB) |",
           "|---|---|---|---|---|---|---|"]
  results = {}
  for act in args.activations.split(","):
    r = results[act] = measure(model_config(act, **p, seq=seq, impl=args.impl), batch, seq,
                               args.steps)
    lines.append(f"| {act} | {r['params']:,} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
                 f"{_fmt(r['mfu'], '.1%')} | {r['compile_s']:.1f} | {_fmt(r['peak_mib'], '.0f')} |")
    print(lines[-1], flush=True)
  if "polynorm" in results and "swiglu" in results:
    overhead = results["polynorm"]["step_ms"] / results["swiglu"]["step_ms"] - 1
    lines += ["", f"PolyNorm step-time overhead over SwiGLU at equal parameters: {overhead:+.1%}"]
  if not args.no_sweep:
    for name, values, key in (("sequence length", seqs, "seq"), ("d_model", widths, "d_model")):
      lines += ["", f"Scaling with {name} (polynorm / swiglu):", "",
                f"| {name} | polynorm step (ms) | swiglu step (ms) | polynorm peak (MiB) | "
                "swiglu peak (MiB) |", "|---|---|---|---|---|"]
      for v in values:
        q = {**p, "seq": seq, key: v}
        if key == "d_model":
          q["ungated_d_ff"] = int(p["ungated_d_ff"] * v / p["d_model"]) // 64 * 64
        s = q.pop("seq")
        row = [measure(model_config(a, **q, seq=s, impl=args.impl), batch, s, args.steps)
               for a in ("polynorm", "swiglu")]
        lines.append(f"| {v} | {row[0]['step_ms']:.1f} | {row[1]['step_ms']:.1f} | "
                     f"{_fmt(row[0]['peak_mib'], '.0f')} | {_fmt(row[1]['peak_mib'], '.0f')} |")
        print(lines[-1], flush=True)
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n### Train step\n\n" + text + "\n")
  return results


if __name__ == "__main__":
  main()
