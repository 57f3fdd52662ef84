"""Stopping on a preemption notice: the signal handler, and the agreement of every process on
the step at which they stop together."""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from polycom_jax.metrics import log


class StopRequest:
  """Turns SIGTERM/SIGINT (preemption notices) into a flag the loop checks after each step."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:          # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    log(f"received signal {signum}: finishing this step and writing a checkpoint "
        "(send it again to abort without one)")
    self.signum = signum
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class StopAgreement:
  """Whether any process was asked to stop, the same answer on every process at the same step.

  Preemption notices reach a pod's hosts at different moments, and the checkpoint that follows
  is a collective every process must enter at the same step (else the run hangs and loses it).
  Each call dispatches an any-reduction of this step's flags over every device and returns the
  previous call's: reading this step's at once would make the host wait for the step to finish,
  every step, and the devices idle while it prepares the next. A stop therefore lands one step
  after the notice, on every process alike. One process takes the same path, so the
  multi-process logic is what every test runs."""

  def __init__(self):
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))  # a process's devices
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))              # are one block
    self._flags = NamedSharding(mesh, P("devices"))
    self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._previous = None

  def __call__(self, local_stop: bool) -> bool:
    flags = jax.make_array_from_process_local_data(                      # [devices]
        self._flags, np.full(jax.local_device_count(), local_stop, np.int32))
    previous, self._previous = self._previous, self._any(flags)
    return previous is not None and bool(np.asarray(previous.addressable_data(0)))
