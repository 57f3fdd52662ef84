"""One training run per workdir: an exclusive lock that a second run is refused by.

flock on WORKDIR/.train.lock, held by the first process of a run for the run's lifetime. The
kernel releases it when that process exits, however it exits (kill -9 included), so a lock is
never stale; the holder's host and pid, written inside, name it in the second run's error.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax

from polycom_jax.config_errors import ConfigError

LOCK_FILE = ".train.lock"


class WorkdirLock:
  """`with WorkdirLock(workdir):` around everything a run writes there."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:        # the run's first process holds it for all of them
      return self
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip()
      f.close()
      try:
        who = json.loads(holder)
        holder = f"host {who['host']}, pid {who['pid']}, since {who['since']}"
      except (ValueError, KeyError, TypeError):
        holder = holder or "holder unknown"
      raise ConfigError(f"--workdir={self.workdir} is in use by another training run "
                        f"({holder}); wait for it or stop it, or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
