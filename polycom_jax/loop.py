"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop on signals."""

from __future__ import annotations

import time
from typing import Callable

import jax
import ml_collections

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import compile_cache
from polycom_jax import data as data_lib
from polycom_jax import evaluation
from polycom_jax import metrics as metrics_lib
from polycom_jax import model as model_lib
from polycom_jax import paths
from polycom_jax import preemption
from polycom_jax import moe
from polycom_jax import setup as setup_lib
from polycom_jax import steps as steps_lib
from polycom_jax.config_errors import RunError
from polycom_jax.metrics import log
from polycom_jax.workdir_lock import WorkdirLock


class NonFiniteError(RunError):
  """Training produced a non-finite loss or gradient and the policy says stop."""


class StepLog:
  """What happens to a finished step's metrics: the non-finite policy, the evaluation when one
  is due, the metrics files (metrics.jsonl, TensorBoard, coefficients.jsonl) and the console
  line. `position()` describes where data and checkpoints stand, for the non-finite error."""

  def __init__(self, s: setup_lib.Setup, workdir: str, start: int, eval_step,
               position: Callable[[], str]):
    c = s.config
    self.s, self.t, self.eval_step, self.position = s, c.train, eval_step, position
    self.writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    self.coefficient_writer = metrics_lib.MetricWriter(workdir, "coefficients.jsonl",
                                                       resume_step=start, tensorboard=False)
    self.progress = metrics_lib.Progress(self.t.num_steps, start)
    self.flops_per_token = model_lib.flops_per_token(s.model_config, c.data.seq_len)
    self.device_kind = jax.devices()[0].device_kind
    self.tokens_per_step = self.t.global_batch_size * c.data.seq_len
    self.last: dict = {}                  # the latest logged metrics
    self.consecutive_bad, self.skipped = 0, 0
    self.window_start, self.window_first = time.time(), start

  def start_clock(self, step: int):
    """Throughput is measured from here (call once the first step has run: compilation and
    start-up are not counted)."""
    self.window_start, self.window_first = time.time(), step

  def eval_due(self, step: int) -> bool:
    t = self.t
    return bool(t.eval_every) and (step % t.eval_every == 0 or step == t.num_steps)

  def __call__(self, step: int, step_metrics: dict, params):
    """Handles step `step`'s metrics; params: the state after it (used when it evaluates)."""
    t = self.t
    m = jax.device_get(step_metrics)
    if m["nonfinite"]:
      self.skipped += 1
      self.consecutive_bad += 1
      if t.nonfinite_policy == "halt" or self.consecutive_bad >= t.max_consecutive_nonfinite:
        raise NonFiniteError(
            f"non-finite loss/gradient at step {step} (loss={m['loss']}, grad_norm="
            f"{m['grad_norm']}; {self.consecutive_bad} in a row, policy "
            f"{t.nonfinite_policy!r}); {self.position()}")
      log(f"step {step}: non-finite loss/gradient, update skipped "
          f"({self.consecutive_bad} in a row)")
    else:
      self.consecutive_bad = 0
    if step % t.log_every and step != t.num_steps:
      return
    elapsed, steps_done = time.time() - self.window_start, step - self.window_first
    # None for the first step alone: its time is mostly compilation (start_clock).
    tps = self.tokens_per_step * steps_done / max(elapsed, 1e-9) if steps_done else None
    last = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "tokens_per_sec": tps, "step_time": elapsed / steps_done if steps_done else None,
            "skipped_updates": self.skipped, "tokens_seen": step * self.tokens_per_step,
            "mfu": tps and metrics_lib.mfu(self.flops_per_token, tps, jax.device_count(),
                                           self.device_kind),
            **{f"moe_{k}": float(m[k]) for k in moe.aux_names(self.s.model_config)}}
    if self.eval_due(step):
      s = self.s
      ev = evaluation.evaluate(s, self.eval_step, params, evaluation.eval_batches(
          s, t.eval_batches, s.config.eval.batch_size))
      last.update({f"eval_{k}": v for k, v in ev.items() if k != "tokens"})
    self.window_start, self.window_first = time.time(), step
    self.last = last
    self.writer.write(step, last)
    if "coefficients" in m:
      self.coefficient_writer.write(step, {"layers": m["coefficients"].tolist()})
    log(self.progress.line(step, last))

  def close(self):
    self.writer.close()
    self.coefficient_writer.close()


def _resume_or_init(s: setup_lib.Setup, checkpointer, config_dict: dict, train_iter):
  """(first step, state): the workdir's latest good checkpoint (with the data position it
  saved), or a fresh state at step 0."""
  mc = s.model_config
  log(f"model: {model_lib.num_params(mc):,} parameters, activation {mc.activation}, "
      f"attention {mc.attention_impl}, {mc.dtype}, remat {mc.remat}"
      f"{f', mlp chunk {mc.mlp_chunk}' if mc.mlp_chunk else ''}; mesh {dict(s.mesh.shape)}")
  if not checkpointer.steps():
    log("initialised the parameters")
    return 0, setup_lib.init_state(s)
  start, state, data_state = checkpointer.restore_latest_good(s.abstract_state, config_dict,
                                                              warn=log, set_aside=True)
  data_lib.check_resumable(checkpointer.read_config(start).get("data", {}), config_dict["data"],
                           start)
  if data_state is None:
    log(f"warning: the step-{start} checkpoint was written by a different number of "
        "processes; each process's data position cannot carry over, so the data iterators "
        "start again from the beginning of their shards")
  else:
    train_iter.set_state(data_state)
  log(f"resumed from step {start} in {checkpointer.directory}")
  return start, state


def _save(checkpointer, step: int, state, train_iter, config_dict: dict, force: bool = False):
  """Checkpoints the state after `step` with the data position, unless that step is saved."""
  if step not in checkpointer.steps():
    checkpointer.save(step, state, train_iter.get_state(), config_dict, force=force)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint if any); returns the last metrics.
  A second run on the same workdir is refused while this one holds it (WorkdirLock)."""
  workdir = paths.resolve(workdir, "--workdir")
  s = setup_lib.setup(config)
  setup_lib.check_workdir(workdir)
  data_lib.check_data_config(config.data)
  with WorkdirLock(workdir):
    log(f"compilation cache: {compile_cache.enable(workdir) or 'off'}")
    return _train(s, config, workdir)


def _train(s: setup_lib.Setup, config: ml_collections.ConfigDict, workdir: str) -> dict:
  t = config.train
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  config_dict = setup_lib.config_as_dict(config)
  train_iter = data_lib.make_train_iterator(
      config.data, s.tokenizer, batch_size=s.per_process_batch, seed=config.data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  step_log = None
  try:
    start, state = _resume_or_init(s, checkpointer, config_dict, train_iter)
    train_step, eval_step = steps_lib.make_train_step(s), steps_lib.make_eval_step(s)
    step_log = StepLog(s, workdir, start, eval_step, position=lambda: (
        f"the data iterator is now at {train_iter.get_state()!r}. "
        f"The last checkpoint is step {checkpointer.latest_step()}."))

    # Step t's metrics are read after step t+1 is dispatched, so the host never idles the
    # devices; steps that evaluate or checkpoint are handled at once (they use that state).
    agree_to_stop = preemption.StopAgreement()
    with preemption.StopRequest() as stop, jax.set_mesh(s.mesh):
      step, pending = start, None
      while step < t.num_steps:
        batch = steps_lib.global_batch(s, next(train_iter))
        state, step_metrics = train_step(state, batch)
        step += 1
        if step == start + 1:
          jax.block_until_ready(step_metrics)
          step_log.start_clock(step)
        if pending is not None:
          step_log(*pending, state["params"])
        pending = (step, step_metrics)
        checkpoint_due = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
        stopping = agree_to_stop(stop.signum is not None)    # the same step on every process
        if step_log.eval_due(step) or step == t.num_steps or stopping or checkpoint_due:
          step_log(*pending, state["params"])
          pending = None
        # No checkpoint inside a streak of skipped (non-finite) steps: a restart then resumes
        # from before the streak and meets it again, so max_consecutive_nonfinite still stops
        # an auto-requeued diverged run instead of letting it creep forward.
        streak = step_log.consecutive_bad
        if streak and (checkpoint_due or stopping):
          log(f"step {step}: not checkpointing inside a streak of {streak} non-finite steps")
        elif checkpoint_due:
          _save(checkpointer, step, state, train_iter, config_dict)
        if stopping:
          if not streak:
            _save(checkpointer, step, state, train_iter, config_dict, force=True)
          checkpointer.close()
          why = (f"signal {stop.signum}" if stop.signum is not None else
                 "a stop on another process")
          saved = (f"checkpoint at step {step} written" if not streak else
                   "no checkpoint inside the streak, the last is step "
                   f"{checkpointer.latest_step()}")
          log(f"received {why}: {saved}; run the same command to resume")
          return {"step": step, "preempted": True, **step_log.last}
      _save(checkpointer, step, state, train_iter, config_dict, force=True)
    checkpointer.close()
    log(f"done: step {step}, checkpoints in {checkpointer.directory}, "
        f"metrics in {paths.join(workdir, 'metrics.jsonl')}")
    return {"step": step, **step_log.last}
  finally:
    # Each is closed even when another fails, and a failure here never hides the error that
    # ended the run (a full disk also fails TensorBoard's last flush).
    for close in (checkpointer.close, step_log and step_log.close,
                  train_iter.close):     # stops grain's worker processes, frees shared memory
      try:
        if close:
          close()
      except Exception as e:  # noqa: BLE001 - reported, not raised
        log(f"warning: while stopping: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
