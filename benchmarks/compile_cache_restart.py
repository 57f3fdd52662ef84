"""What the persistent compilation cache saves on a restart: the config's train and eval steps
compiled (from abstract shapes, nothing run) in a fresh process with an empty cache, then again in
a second fresh process with the cache the first one wrote, as a restarted train.py or an eval.py
would. CPU timing on this machine (benchmarks/RESULTS.md, "Compilation cache").

  python -m benchmarks.compile_cache_restart [--config=configs/paper_dense_1b.py] [--batch=1]
  .venv-tpu/bin/python -m benchmarks.compile_cache_restart --topology=v5e:4x4

On CPU (one device, --batch global batch; the compile time hardly depends on it), or, with
--topology, for a TPU slice as the compile check does (libtpu, the config's mesh and batch). Reports, per process: the
seconds from the first line of the script to both steps compiled, the seconds of each step's
lower + compile, and the cache's files and bytes afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()


def child(config_path: str, batch: int, cache: str, topology: str | None) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["POLYCOM_COMPILATION_CACHE"] = cache
  import jax  # pylint: disable=g-import-not-at-top
  from polycom_jax import compile_cache, compile_check  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.tokenizer = "byte"        # no tokenizer file needed; the vocabulary stays the config's
  if topology:
    devices = compile_check.get_topology_devices(topology)
    config = compile_check.prepare_config(config)
  else:
    devices = jax.devices()[:1]
    config.train.global_batch_size = config.eval.batch_size = batch
    config.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  compile_cache.enable(cache)
  _, reports, _, _ = compile_check.compile_steps(config, devices)
  files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
  return {"ready_s": time.perf_counter() - T0,
          **{f"{r.name}_compile_s": r.compile_s for r in reports},
          "cache_files": len(files), "cache_bytes": sum(map(os.path.getsize, files)),
          "layers": config.model.num_layers, "jax": jax.__version__}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/paper_dense_1b.py")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--topology", default=None, help="a TPU slice, e.g. v5e:4x4 (needs libtpu)")
  p.add_argument("--child_cache", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child_cache:
    print(json.dumps(child(a.config, a.batch, a.child_cache, a.topology)))
    return
  with tempfile.TemporaryDirectory() as cache:
    runs = []
    for _ in ("cold", "warm"):
      out = subprocess.run([sys.executable, "-m", "benchmarks.compile_cache_restart",
                            f"--config={a.config}", f"--batch={a.batch}",
                            f"--child_cache={cache}", *([f"--topology={a.topology}"] if a.topology
                                                       else [])],
                           check=True, capture_output=True, text=True)
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  cold, warm = runs
  target = (f"compiled for {a.topology} (config mesh and batch)" if a.topology else
            f"compiled for this CPU, global batch {a.batch}")
  print(f"{datetime.date.today()}, {a.config} ({cold['layers']} layers), {target}, "
        f"jax {cold['jax']}, {platform.machine()} CPU, {os.cpu_count()} cores\n")
  print("| process | ready (s) | train step lower+compile (s) | eval step (s) | cache files | "
        "cache MiB |\n|---|---:|---:|---:|---:|---:|")
  for name, r in (("first (empty cache)", cold), ("restart (cache)", warm)):
    print(f"| {name} | {r['ready_s']:.1f} | {r['train_compile_s']:.1f} | "
          f"{r['eval_compile_s']:.1f} | {r['cache_files']} | {r['cache_bytes'] / 2**20:.1f} |")
  print(f"\nsaved on restart: {cold['ready_s'] - warm['ready_s']:.1f} s "
        f"({cold['ready_s'] / warm['ready_s']:.1f}x faster to the first step)")


if __name__ == "__main__":
  main()
