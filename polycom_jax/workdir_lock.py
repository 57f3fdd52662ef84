"""One training run per workdir: an exclusive lock that a second run is refused by.

Local workdir: flock on WORKDIR/.train.lock, held by the first process of a run for the run's
lifetime. The kernel releases it when that process exits, however it exits (kill -9 included),
so a lock is never stale; the holder's host and pid, written inside, name it in the second
run's error.

gs:// workdir: an object store has no flock. The lock is the object WORKDIR/.train.lock,
created only if absent (GCS's ifGenerationMatch=0, through fsspec's exclusive mode "xb"),
holding the holder's host, pid and a heartbeat that a thread renews every HEARTBEAT_SECONDS.
It is deleted on exit; one left by a killed run is taken over once its heartbeat is older
than STALE_SECONDS (so a run restarted right after a kill -9 waits that long or is told to).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time

import jax

from polycom_jax import paths
from polycom_jax.config_errors import ConfigError

LOCK_FILE = ".train.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 300.0


class WorkdirLock:
  """`with WorkdirLock(workdir):` around everything a run writes there."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, paths.join(workdir, LOCK_FILE)
    self._file = None
    self._object = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:        # the run's first process holds it for all of them
      return self
    if paths.is_uri(self.path):
      self._object = ObjectLock(self.path, self.workdir).acquire()
      return self
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip()
      f.close()
      raise _in_use(self.workdir, holder) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()))
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc):
    if self._object is not None:
      self._object.release()
      self._object = None
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _holder(since: str | None = None) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": since or time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}


def _in_use(workdir: str, holder: str) -> ConfigError:
  try:
    who = json.loads(holder)
    holder = f"host {who['host']}, pid {who['pid']}, since {who['since']}"
  except (ValueError, KeyError, TypeError):
    holder = holder or "holder unknown"
  return ConfigError(f"--workdir={workdir} is in use by another training run ({holder}); wait "
                     "for it or stop it, or use another --workdir")


class ObjectLock:
  """The lock object of a gs:// workdir (see the module docstring)."""

  def __init__(self, path: str, workdir: str):
    self.path, self.workdir = path, workdir
    self._fs = paths.filesystem(path)
    self._since = time.strftime("%Y-%m-%d %H:%M:%S")
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> "ObjectLock":
    if self._fs.exists(self.path):
      held = self._read()
      age = time.time() - float(_field(held, "heartbeat", 0.0))
      if age < STALE_SECONDS:
        raise _in_use(self.workdir, held)
      print(f"warning: taking over the lock {self.path}: its holder's last heartbeat was "
            f"{age:.0f} s ago (a run that was killed)", flush=True)
      self._fs.rm(self.path)
    try:
      with self._fs.open(self.path, "xb") as f:        # fails if another run created it first
        f.write(json.dumps(_holder(self._since)).encode())
    except FileExistsError:
      raise _in_use(self.workdir, self._read()) from None
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()
    return self

  def _read(self) -> str:
    try:
      return self._fs.cat_file(self.path).decode()
    except FileNotFoundError:
      return ""

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self._fs.pipe_file(self.path, json.dumps(_holder(self._since)).encode())
      except Exception as e:  # a network blip: the next beat tries again
        print(f"warning: could not renew the lock {self.path}: {e}", flush=True)

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      self._fs.rm(self.path)
    except FileNotFoundError:
      pass


def _field(text: str, name: str, default):
  try:
    return json.loads(text).get(name, default)
  except (ValueError, AttributeError):
    return default
