"""How far the MoE design reaches past the machines we can run on: paper_moe compiled (not run)
for v5p slices of 64 to 512 chips with 64 and 256 experts, for the expert paths, as one
markdown table (benchmarks/RESULTS.md, "MoE at scale").

  .venv-tpu/bin/python -m benchmarks.moe_scaling [--experts=64,256] [--chips=64,512]
      [--impls=ragged,dispatch] [--resume=FILE]

Weak scaling: 16 sequences of 4096 per chip (the paper's 1024 on 64 chips), mesh fsdp 8 x
expert chips/8, the rest of the config as configs/paper_moe.py (16 layers, top-8, expert width
2304, full remat, splash, megablox). Per case: per-chip HBM of the train step, XLA FLOPs
against the model's, and the collectives' bytes per chip in the compiled HLO
(compile_check.py; its 1- and 2-layer extrapolation). Needs libtpu (requirements-tpu.txt);
about 8 minutes per case on 2 CPU cores; --resume keeps finished cases in a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from configs import paper_moe  # noqa: E402
from polycom_jax import compile_check  # noqa: E402

TOPOLOGIES = {64: "v5p:4x4x4", 128: "v5p:4x4x8", 256: "v5p:4x8x8", 512: "v5p:8x8x8"}
PER_CHIP = 16
FSDP = 8
GiB = 2 ** 30


def case_config(experts: int, chips: int, impl: str):
  c = paper_moe.get_config()
  c.model.update(num_experts=experts, moe_impl=impl)
  # dispatch: a per-destination buffer of 1.25x the even share (drops are possible, and counted)
  c.train.global_batch_size = c.eval.batch_size = PER_CHIP * chips
  c.mesh.update(data=1, fsdp=FSDP, expert=chips // FSDP, tensor=1)
  return c


def one_case(experts: int, chips: int, impl: str) -> dict:
  log = io.StringIO()
  key = {"experts": experts, "chips": chips, "impl": impl}
  try:
    r = compile_check.run(case_config(experts, chips, impl), TOPOLOGIES[chips], skip_eval=True,
                          out=log)
  except compile_check.CompileError as e:
    return key | {"error": str(e)[:300]}
  train = r["steps"]["train"]
  return key | {"total": train["total"], "temp": train["temp"], "oom": train["oom"],
                "hbm": r["hbm_bytes"], "fits": r["fits"], "xla_flops": train["flops"],
                "model_flops": r["model_flops_per_chip"], "collectives": train["collectives"],
                "compile_s": train["compile_s"], "params": r["num_params"]}


def markdown(results: list[dict]) -> str:
  g = lambda b: f"{b / GiB:.1f}"
  lines = ["| experts (total params) | chips (fsdp x expert) | path | train total/chip (GiB) | "
           "fits in 95 GiB | XLA FLOPs / model FLOPs | collective GiB/chip/step (all-gather, "
           "reduce-scatter, all-reduce, all-to-all) |", "|---|---|---|---:|---|---:|---|"]
  for r in results:
    path = "gather experts (ragged)" if r["impl"] == "ragged" else r["impl"]
    params = f" ({r['params'] / 1e9:.1f}B)" if "params" in r else ""
    head = f"| {r['experts']}{params} | {r['chips']} ({FSDP} x {r['chips'] // FSDP}) | {path} |"
    if "error" in r:
      lines.append(f"{head} does not compile: {r['error'][:120]} | | | |")
    elif r["oom"]:
      lines.append(f"{head} {g(r['total'])} (compiler: out of HBM) | **no** | - | - |")
    else:
      c = r["collectives"]
      kinds = ", ".join(g(c.get(k, 0)) for k in ("all-gather", "reduce-scatter", "all-reduce",
                                                 "all-to-all"))
      lines.append(f"{head} {g(r['total'])} | {'yes' if r['fits'] else '**no**'} | "
                   f"{r['xla_flops'] / r['model_flops']:.2f} | {g(sum(c.values()))} ({kinds}) |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experts", default="64,256")
  p.add_argument("--chips", default="64,512")
  p.add_argument("--impls", default="ragged,dispatch")
  p.add_argument("--resume", default=None, help="JSON file of finished cases (read and extended)")
  a = p.parse_args()
  done = []
  if a.resume and os.path.exists(a.resume):
    with open(a.resume) as f:
      done = json.load(f)
  for experts in map(int, a.experts.split(",")):
    for chips in map(int, a.chips.split(",")):
      for impl in a.impls.split(","):
        if any((d["experts"], d["chips"], d["impl"]) == (experts, chips, impl) for d in done):
          continue
        done.append(one_case(experts, chips, impl))
        print(json.dumps({k: v for k, v in done[-1].items() if k != "collectives"}), flush=True)
        if a.resume:
          with open(a.resume, "w") as f:
            json.dump(done, f)
  print(f"\n{datetime.date.today()}, jax {jax.__version__}, {platform.machine()} CPU, "
        f"{os.cpu_count()} cores\n")
  print(markdown(done))


if __name__ == "__main__":
  main()
