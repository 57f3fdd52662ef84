"""Compile a config's sharded train and eval steps for a named TPU slice, on a CPU machine.

  .venv-tpu/bin/python compile_check.py --config=configs/paper_dense_1b.py --topology=v5p:2x2x4 \
      [--config.a.b=v ...] [--skip_eval] [--max_batch] [--json_out=FILE]

Needs libtpu (requirements-tpu.txt, its own venv). Prints per-chip memory against HBM, XLA's
FLOPs against the model's, and compile times (polycom_jax/compile_check.py). Exit status: 0 fits,
1 does not fit (the compiler ran out of memory, or the step failed to compile), 2 bad config /
topology / libtpu missing.
"""

import json
import os

# Compile on this (CPU) machine; several libtpu users at once (tests, parallel checks) need
# libtpu's single-process lock relaxed. Set before JAX starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from polycom_jax import cli, compile_check  # noqa: E402
from polycom_jax.config_errors import RunError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice, e.g. v5p:2x2x2 (8 chips), v5e:4x4 (16), v4:2x2x2, v6e:2x2.",
    required=True)
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Compile the train step only.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the numbers (bytes) to this file.")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Also search for the largest global batch (without gradient "
    "accumulation) whose train step fits: a few more compiles.")


def _check():
  topology = _TOPOLOGY.value
  try:
    result = compile_check.run(_CONFIG.value, topology, _SKIP_EVAL.value, _MAX_BATCH.value)
  except compile_check.CompileError as e:
    raise compile_check.CompileError(f"{topology}: {e}") from None
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  if not result["fits"]:
    steps = result["steps"].values()
    worst = max(s["total"] for s in steps)
    gave_up = " or more (the compiler gave up)" if any(s["oom"] for s in steps) else ""
    raise RunError(f"does not fit: {worst / compile_check.GiB:.2f} GiB per chip needed"
                   f"{gave_up}, {result['hbm_bytes'] / compile_check.GiB:.2f} GiB HBM on "
                   f"{result['device_kind']}")


def main(argv):
  del argv
  cli.run(_check, config=_CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
