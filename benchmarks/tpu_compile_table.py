"""The paper configs compiled for TPU slices (compile_check.py, polycom_jax/compile_check.py), as one markdown table.

  .venv-tpu/bin/python -m benchmarks.tpu_compile_table [--rows=dense|moe|all] [--json=FILE]
      [--resume=FILE] [--out=RESULTS.md]

Each row compiles the real sharded train and eval steps at the paper's batch and sequence
length for a slice; the SEARCHED rows also search for the largest global batch whose train
step fits (compile_check --max_batch). Needs libtpu (requirements-tpu.txt); runs on a CPU
machine, about an hour for all rows on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from configs import paper_dense_1b, paper_moe  # noqa: E402
from polycom_jax import compile_check  # noqa: E402

DENSE_ACTIVATIONS = ("polynorm", "polyrelu", "swiglu", "relu2", "gelu", "relu")
DENSE_SLICES = ("v5p:2x2x4", "v5e:4x4")          # 16 chips each: v5p-32, v5e-16
MOE_SLICES = ("v5p:4x4x4", "v5e:8x8")            # 64 chips each: the config's fsdp 8 x expert 8
GiB = 2 ** 30


# The largest-batch search (a few more compiles each) for these rows only; activations change
# the activation memory little, so PolyNorm and the SwiGLU baseline stand for the dense ones.
SEARCHED = ("polynorm", "swiglu", "ragged")


def rows(which: str) -> list[tuple[str, object, str, bool]]:
  """(label, config, topology, search for the largest batch) for every row."""
  out = []
  if which in ("dense", "all"):
    for topology in DENSE_SLICES:
      for act in DENSE_ACTIVATIONS:
        c = paper_dense_1b.get_config()
        c.model.activation = act
        out.append((f"dense 1B, {act}", c, topology, act in SEARCHED))
  if which in ("moe", "all"):
    # v5p-128, v5e-64; the capacity variant; and the paper's batch on the v5e through gradient
    # accumulation (micro-batches of 128, below the largest batch that fits there).
    moe_rows = [(t, "ragged", 0) for t in MOE_SLICES] + [(MOE_SLICES[0], "capacity", 0),
                                                         (MOE_SLICES[1], "ragged", 128)]
    for topology, impl, micro in moe_rows:
      c = paper_moe.get_config()
      c.model.moe_impl = impl
      if micro:
        c.train.micro_batch_size = c.eval.batch_size = micro
      label = f"MoE 10.1B, polynorm, {impl}"
      label += f", micro-batch (and eval batch) {micro}" if micro else ""
      out.append((label, c, topology, impl in SEARCHED and not micro))
  return out


def one_row(label: str, config, topology: str, search: bool) -> dict:
  log = io.StringIO()
  try:
    r = compile_check.run(config, topology, max_batch=search, out=log)
  except compile_check.CompileError as e:
    r = {"error": str(e), "topology": topology}
  r["label"], r["log"] = label, log.getvalue()
  return r


def markdown(results: list[dict]) -> str:
  g = lambda b: f"{b / GiB:.2f}"
  lines = [
      "| config | slice (mesh) | state/chip (GiB) | train temp/chip (GiB) | train total/chip "
      "(GiB) | HBM (GiB) | fits at the paper's batch | largest global batch that fits | "
      "XLA FLOPs/chip | model FLOPs/chip | eval total/chip (GiB) | compile train / eval |",
      "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['label']} | {r.get('topology', '')} | compile error: "
                   f"{r['error'][:200]} |" + " |" * 9)
      continue
    train, ev = r["steps"]["train"], r["steps"].get("eval")
    mesh = " x ".join(f"{a} {v}" for a, v in r["mesh"].items() if v > 1)
    oom = " (compiler: out of HBM)" if train["oom"] else ""
    seq_per_chip = r["global_batch_size"] / r["num_chips"]
    best = r.get("max_global_batch")
    best = "not searched" if best is None else f"{best} ({best / r['num_chips']:g}/chip)"
    lines.append(
        f"| {r['label']} | {r['topology']}, {r['num_chips']} chips ({mesh}) | "
        f"{g(r['param_bytes'] + r['opt_state_bytes'])} | {g(train['temp'])}{oom} | "
        f"{g(train['total'])} | {g(r['hbm_bytes'])} | "
        f"{'yes' if r['fits'] else '**no**'} ({r['global_batch_size']}, "
        f"{seq_per_chip:g}/chip) | {best} | "
        f"{'-' if train['oom'] else format(train['flops'], '.3e')} | "
        f"{r['model_flops_per_chip']:.3e} | {g(ev['total']) if ev else '-'} | "
        f"{train['compile_s']:.0f} s / {ev['compile_s'] if ev else 0:.0f} s |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", choices=("dense", "moe", "all"), default="all")
  parser.add_argument("--json", default=None, help="also write every row's numbers here")
  parser.add_argument("--out", default=None, help="append the table to this markdown file")
  parser.add_argument("--resume", default=None,
                      help="a --json file of an interrupted run: its rows are kept, not redone")
  args = parser.parse_args()
  done = {}
  if args.resume:
    with open(args.resume) as f:
      done = {(r["label"], r["topology"]): r for r in json.load(f)}
  results = []
  for label, config, topology, search in rows(args.rows):
    if (label, topology) in done:
      results.append(done[(label, topology)])
      continue
    print(f"== {label} on {topology}", file=sys.stderr, flush=True)
    results.append(one_row(label, config, topology, search))
    print(results[-1]["log"], file=sys.stderr, flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
  import libtpu  # noqa: F401 - the run above needed it
  header = (f"\n`.venv-tpu/bin/python -m benchmarks.tpu_compile_table --rows={args.rows}` "
            f"({platform.machine()} CPU, {os.cpu_count()} cores, no TPU; jax {jax.__version__}, "
            f"libtpu {getattr(libtpu, '__version__', '?')}; {datetime.date.today()})\n\n")
  table = header + markdown(results) + "\n"
  print(table)
  if args.out:
    with open(args.out, "a") as f:
      f.write(table)


if __name__ == "__main__":
  main()
