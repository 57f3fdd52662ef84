"""Runs in a subprocess of tests/test_cloud_storage.py, against a GCS emulator on loopback.

The environment (emulator endpoints, no metadata-server lookups) is set by the test before
this process starts: google-auth reads it at import. argv: corpus glob, data dir, local dir.
Prints one JSON line of what it saw.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402
from polycom_jax import checkpoint as ckpt_lib  # noqa: E402
from polycom_jax import evaluation, loop, paths  # noqa: E402
from polycom_jax import workdir_lock  # noqa: E402
from polycom_jax.config_errors import ConfigError  # noqa: E402

BUCKET = "gs://polycom-test"


def losses(metrics_text: str) -> list:
  return [(r["step"], r["loss"]) for r in map(json.loads, metrics_text.splitlines())]


def main(corpus_glob: str, data_dir: str, local_dir: str):
  config = tiny_config(corpus_glob, data_dir, eval_every=6)
  config.data.prepared_dir = f"{BUCKET}/prepared"
  out = {}

  # The reference: six steps in a local workdir (the rows are prepared into the bucket).
  loop.train(config, local_dir)
  with open(os.path.join(local_dir, "metrics.jsonl")) as f:
    out["local_losses"] = losses(f.read())
  out["local_eval"] = evaluation.evaluate_checkpoint(config, local_dir, with_unigram=False)["loss"]

  # The same run in a bucket, stopped after step 3 and resumed to 6.
  run = f"{BUCKET}/runs/a"
  first = config.copy_and_resolve_references()
  first.train.num_steps = 3
  loop.train(first, run)
  loop.train(config, run)
  out["gs_losses"] = losses(paths.read_text(f"{run}/metrics.jsonl"))
  out["gs_eval"] = evaluation.evaluate_checkpoint(config, run, with_unigram=False)["loss"]
  # Step 6 damaged (its arrays' manifest gone): set aside, steps 4..6 trained again.
  fs = paths.filesystem(BUCKET)
  fs.rm(f"{run}/checkpoints/6/state/manifest.ocdbt")
  loop.train(config, run)
  out["after_corruption_losses"] = losses(paths.read_text(f"{run}/metrics.jsonl"))
  out["after_corruption_steps"] = ckpt_lib.Checkpointer(run).steps()
  out["objects"] = sorted(name.split("/runs/a/", 1)[1] for name in fs.find(run))
  out["prepared"] = sorted(name.split("/prepared/", 1)[1] for name in fs.find(f"{BUCKET}/prepared"))
  out["local_prepared"] = os.path.isdir(os.path.join(data_dir, "prepared"))

  # The lock: a second holder is refused while the first holds it; a stale one is taken over.
  locked = f"{BUCKET}/runs/locked"
  with workdir_lock.WorkdirLock(locked):
    try:
      with workdir_lock.WorkdirLock(locked):
        out["second_lock"] = "acquired"
    except ConfigError as e:
      out["second_lock"] = str(e)
  out["lock_left"] = paths.exists(f"{locked}/{workdir_lock.LOCK_FILE}")
  stale = {"host": "gone", "pid": 1, "since": "earlier",      # a run killed long ago
           "heartbeat": time.time() - 2 * workdir_lock.STALE_SECONDS}
  paths.write_text(f"{locked}/{workdir_lock.LOCK_FILE}", json.dumps(stale))
  with workdir_lock.WorkdirLock(locked):
    out["stale_lock_holder"] = json.loads(paths.read_text(
        f"{locked}/{workdir_lock.LOCK_FILE}"))["host"]
  try:
    loop.train(config, "s3://bucket/run")
  except ConfigError as e:
    out["other_scheme"] = str(e)
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:4])
