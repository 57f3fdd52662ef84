"""Orbax checkpoints of a run: train state, data-iterator state and the config, per step.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. `state` holds params, optimizer state
and step (sharded arrays, written collectively by all processes); `data` every process's grain
iterator state, {"per_process": [...]} (each process reads its own shard of the data; so a
resumed run sees exactly the batches an uninterrupted one would); `config` the run's config as
JSON, used to refuse restoring a checkpoint into a different model.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from polycom_jax import paths
from polycom_jax.config_errors import ConfigError, RunError

# Config fields that must agree between a checkpoint and the run restoring it (the params'
# shapes and meaning depend on them). Everything else (steps, lr, mesh, ...) may change.
MODEL_FIELDS_EXEMPT = ("activation_impl", "attention_impl", "remat", "dtype",
                       "moe_impl", "moe_capacity_factor",
                       "init_std", "output_init_std", "init_truncation")   # init only
# Values older checkpoints wrote for a field that has since become a choice of names.
LEGACY_VALUES = {"qk_norm": {False: "none", True: "head"}}


class CheckpointError(RunError):
  """A checkpoint could not be written or read; the message names the path."""


def gather_data_states(data_state: dict) -> dict:
  """{"per_process": [each process's data state]}: Orbax writes a JSON item from process 0
  only, so the other processes' iterator states travel to it first (a collective call)."""
  if jax.process_count() == 1:
    return {"per_process": [data_state]}
  raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(raw.size))            # [processes]
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)                         # [processes, max]
  return {"per_process": [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]}


def this_process_data_state(saved: dict) -> dict | None:
  """This process's data state from a checkpoint's `data` item. Written by a different number
  of processes: the common state when every process saved the same one (prepared rows: the
  global step), else None (a position in another sharding of the data does not carry)."""
  states = saved.get("per_process", [])
  if len(states) == jax.process_count():
    return states[jax.process_index()]
  if states and all(s == states[0] for s in states):
    return states[0]
  return None


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.resolve(workdir, "--workdir"), "checkpoints")


def incomplete_checkpoints(directory: str) -> list[str]:
  """Step folders a killed save left behind: Orbax's tmp folders, or steps never committed."""
  found = []
  for name in paths.listdir(directory):
    path = paths.join(directory, name)
    if ".orbax-checkpoint-tmp" in name:
      found.append(path)
    elif re.fullmatch(r"\d+", name) and not paths.exists(paths.join(path, "commit_success.txt")):
      found.append(path)
  return found


class Checkpointer:
  """Saves and restores (state, data state, config) by step; keeps the last `keep`."""

  def __init__(self, workdir: str, keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self.directory = checkpoint_dir(workdir)
    self.incomplete = incomplete_checkpoints(self.directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))
    self._closed = False
    self._pending_step = -1                 # the step of the last save started

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, config: dict,
           force: bool = False) -> bool:
    """Starts an (async) save; returns whether a save was started at this step.

    A failure (disk full, permissions) is a CheckpointError under the step whose save failed:
    the previous async save is waited for first, so its failure is not reported under this
    step; the earlier, committed checkpoints are left as they are.
    """
    self.wait()
    self._pending_step = step
    try:
      return self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(gather_data_states(data_state or {})),
          config=ocp.args.JsonSave(config)), force=force)
    except Exception as e:  # Orbax and tensorstore raise many types for I/O failures
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, e: Exception) -> CheckpointError:
    committed = [s for s in self.steps() if s != step]
    return CheckpointError(
        f"saving the checkpoint of step {step} in {self.directory} failed: "
        f"{type(e).__name__}: {e}. Is the disk full or the directory not writable? "
        f"Committed checkpoints are untouched: steps {committed}. Free space (or fix the "
        "permissions) and run the same command: it resumes from step "
        f"{committed[-1] if committed else 0}.")

  def read_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
    """State (sharded like abstract_state's ShapeDtypeStructs) and this process's data state at
    step (None if the checkpoint was written by a different number of processes)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, this_process_data_state(restored.data)

  def read_data_states(self, step: int) -> list[dict]:
    """Every process's data state at step, in process order."""
    return self._manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore())).data["per_process"]

  def restore_latest_good(self, abstract_state: Any, current_config: dict | None = None,
                          warn: Callable[[str], None] = print,
                          set_aside: bool = False) -> tuple[int, Any, dict | None]:
    """(step, state, data state) of the newest checkpoint that reads back; unreadable (corrupt,
    truncated) or uncommitted ones are reported with their path and skipped. The config check
    runs on the newest readable config, so a checkpoint of another model is refused, not
    skipped. set_aside (training): skipped step folders are moved to WORKDIR/corrupt_checkpoints
    (kept, not deleted), so that the run writes those steps again."""
    for path in self.incomplete:
      warn(f"warning: ignoring incomplete checkpoint {path} (a save was interrupted)")
    uncommitted = {int(os.path.basename(p)) for p in self.incomplete
                   if os.path.basename(p).isdigit()}
    damaged = []
    try:
      for step in reversed(self.steps()):
        path = paths.join(self.directory, str(step))
        if step in uncommitted:
          damaged.append(step)
          continue
        try:
          saved_config = self.read_config(step)
        except Exception as e:
          warn(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {_short(e)}); "
               "trying the previous one")
          damaged.append(step)
          continue
        if current_config is not None:
          check_compatible(saved_config, current_config)
        try:
          state, data_state = self.restore(step, abstract_state)
          return step, state, data_state
        except Exception as e:
          warn(f"warning: checkpoint {path} is corrupt ({type(e).__name__}: {_short(e)}); "
               "trying the previous one")
          damaged.append(step)
      raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {self.steps()} "
                            "all failed to restore, see the warnings above)")
    finally:
      if set_aside and damaged:
        self._set_aside(damaged, warn)

  def _set_aside(self, steps: list[int], warn: Callable[[str], None]):
    """Moves damaged step folders out of the manager's sight, to be written again."""
    target = paths.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    if jax.process_index() == 0:
      paths.makedirs(target)
      for step in steps:
        dest = paths.join(target, str(step))
        n = 1
        while paths.exists(dest):
          dest, n = paths.join(target, f"{step}.{n}"), n + 1
        paths.move_tree(paths.join(self.directory, str(step)), dest)
        warn(f"warning: moved the damaged checkpoint of step {step} to {dest}; this run "
             "writes that step again")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("polycom_jax: damaged checkpoints set aside")
    self._manager.reload()

  def wait(self):
    """Waits for the async save in flight; its failure names its own step."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(self._pending_step, e) from e

  def close(self):
    """Waits for the last async save and releases the manager; a second call does nothing."""
    if self._closed:
      return
    self._closed = True
    self.wait()
    self._manager.close()


def _short(e: Exception, limit: int = 200) -> str:
  text = str(e).splitlines()[0] if str(e) else ""
  return text[:limit]


def resolve_step(checkpointer: Checkpointer, step: int | None) -> int:
  """The requested step, or the latest; a clear error when there is none or it does not exist."""
  steps = checkpointer.steps()
  if not steps:
    raise ConfigError(f"no checkpoint found in {checkpointer.directory}: train first "
                      "(train.py --workdir=...) or point --workdir at a run")
  if step is None or step < 0:
    return steps[-1]
  if step not in steps:
    raise ConfigError(f"--step={step}: no checkpoint at that step in {checkpointer.directory}; "
                      f"available steps: {steps}")
  return step


def check_compatible(saved: dict, current: dict):
  """Raises ConfigError naming every model/data field whose value differs from the checkpoint."""
  diffs = []
  for section, exempt in (("model", MODEL_FIELDS_EXEMPT), ("data", None)):
    fields = (("tokenizer", "tokenizer_path") if section == "data" else
              sorted(set(saved.get("model", {})) | set(current.get("model", {}))))
    for name in fields:
      if exempt and name in exempt:
        continue
      a = saved.get(section, {}).get(name)
      b = current.get(section, {}).get(name)
      legacy = LEGACY_VALUES.get(name, {})
      a, b = (legacy.get(v, v) if isinstance(v, bool) else v for v in (a, b))
      if a != b:
        diffs.append(f"config.{section}.{name}: checkpoint has {a!r}, this run has {b!r}")
  if diffs:
    raise ConfigError("the checkpoint was written by a different model:\n  " + "\n  ".join(diffs)
                      + "\nuse another --workdir, or the checkpoint's config")
