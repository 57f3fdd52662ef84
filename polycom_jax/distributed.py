"""Multi-process start-up: jax.distributed.initialize from flags, env, or the platform."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import jax
from absl import flags, logging

_COORDINATOR = "coordinator_address"
_NUM_PROCESSES = "num_processes"
_PROCESS_ID = "process_id"


def define_flags():
  """--coordinator_address / --num_processes / --process_id (also read from env: JAX_...)."""
  flags.DEFINE_string(_COORDINATOR, None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer(_NUM_PROCESSES, None, "Total number of processes.")
  flags.DEFINE_integer(_PROCESS_ID, None, "This process's index.")


def _setting(name: str, env: str):
  value = getattr(flags.FLAGS, name, None)
  return value if value is not None else os.environ.get(env)


def _on_cloud_tpu_vm() -> bool:
  """libtpu installed and TPU chips attached (v4/v5e: /dev/accel*, v5p/v6e: /dev/vfio/N): a
  Cloud TPU VM, where jax.distributed.initialize() reads the pod's layout from the metadata
  server (one host or many). Checked without starting a JAX backend, which must wait."""
  return (importlib.util.find_spec("libtpu") is not None
          and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def initialize():
  """Initialises jax.distributed when more than one process is (or may be) configured.

  Explicit flags (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) win;
  otherwise under SLURM (more than one task), on GKE / multi-slice TPU (TPU_WORKER_HOSTNAMES,
  MEGASCALE_COORDINATOR_ADDRESS) and on Cloud TPU VMs jax detects everything itself; a single
  process elsewhere needs nothing. Processes other than 0 then log errors only.
  """
  coordinator = _setting(_COORDINATOR, "JAX_COORDINATOR_ADDRESS")
  num = _setting(_NUM_PROCESSES, "JAX_NUM_PROCESSES")
  pid = _setting(_PROCESS_ID, "JAX_PROCESS_ID")
  if coordinator or num:
    # The coordinator waits for every process (minutes before it gives up): say so.
    print(f"process {pid if pid is not None else '?'}: joining {num or '?'} processes at "
          f"{coordinator or 'the detected coordinator'} (waits until all have started)",
          file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=None if num is None else int(num),
                               process_id=None if pid is None else int(pid))
  elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES")
        or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or _on_cloud_tpu_vm()):
    jax.distributed.initialize()
  else:
    return
  if jax.process_index() != 0:
    logging.set_verbosity(logging.ERROR)
