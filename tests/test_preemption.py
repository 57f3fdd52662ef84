"""Runs that are signalled, killed or fed bad data: real train.py processes on the tiny config.

Every comparison is exact: a resumed run must log, for every step after the checkpoint it
resumed from, the same loss as a run that was never interrupted.
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import loop
from polycom_jax import preemption
from polycom_jax import setup as setup_lib
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def _command(workdir, corpus_glob, data_dir, *extra):
  return [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.text_glob={corpus_glob}", f"--config.data.data_dir={data_dir}",
          f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=5",
          "--config.train.keep_checkpoints=20", *extra]


def _run(cmd, timeout=240):
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  return proc


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
  return {r["step"]: r["loss"] for r in records}


def _wait_for(predicate, proc, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited early:\n{proc.stderr.read()}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError("timed out")


def _logged_step(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return max((json.loads(line)["step"] for line in f if line.endswith("\n")), default=0)
  except FileNotFoundError:
    return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_glob, data_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  proc = _run(_command(workdir, corpus_glob, data_dir))
  assert proc.returncode == 0, proc.stderr
  return workdir, _losses(workdir)


def test_sigterm_checkpoints_exits_zero_and_resume_is_exact(uninterrupted, tmp_path,
                                                             corpus_glob, data_dir):
  workdir = str(tmp_path)
  cmd = _command(workdir, corpus_glob, data_dir)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_for(lambda: _logged_step(workdir) >= 7, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "checkpoint at step" in out and "run the same command to resume" in out
  stopped = ckpt_lib.Checkpointer(workdir).latest_step()
  assert 7 <= stopped < STEPS
  assert max(_losses(workdir)) == stopped
  proc = _run(cmd)
  assert proc.returncode == 0, proc.stderr
  assert f"resumed from step {stopped}" in proc.stdout
  assert _losses(workdir) == uninterrupted[1]


def test_the_stop_agreement_answers_from_the_previous_steps_flags():
  """Each call dispatches this step's flags and returns the previous call's agreed answer: the
  host never waits for the step it has just dispatched (a blocking all-gather every step would
  idle the devices), and every process decides from the same reduced flags."""
  agree = preemption.StopAgreement()
  assert agree(False) is False
  assert agree(True) is False              # this step's flag is still on the devices
  assert agree(False) is True              # the stop lands one step later
  assert agree(False) is False


KILLS = 6


def _kill_moment(rng, workdir, proc, kind: str, launched: float) -> None:
  """Returns at a random moment of the given kind: during start-up (before or while restoring),
  inside the training steps, or while an async checkpoint write is under way; always before
  step STEPS - 5, so that the last, uninterrupted start has steps left to train."""
  last = STEPS - 5
  if kind == "start-up":
    deadline = time.time() + rng.uniform(0, 10)
    while time.time() < deadline and proc.poll() is None:
      time.sleep(0.02)
  elif kind == "steps":
    target = min(last, _logged_step(workdir) + rng.randint(1, 6))
    _wait_for(lambda: _logged_step(workdir) >= target, proc)
    time.sleep(rng.uniform(0, 0.3))
  else:                                     # a checkpoint write, in this start
    def writing():
      for path in glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")):
        try:
          if os.path.getmtime(path) > launched:
            return True
        except OSError:                     # committed (renamed) meanwhile
          pass
      return _logged_step(workdir) >= last
    _wait_for(writing, proc)
    time.sleep(rng.uniform(0, 0.05))


def test_kill_9_at_random_moments_never_changes_a_loss(uninterrupted, tmp_path, corpus_glob,
                                                       data_dir):
  """train.py killed -9 KILLS times at moments drawn with a fixed seed (in start-up, between
  and inside steps, during checkpoint writes), each time restarted with the same command:
  the run finishes with exactly the uninterrupted run's loss at every step."""
  rng = random.Random(18)
  workdir = str(tmp_path)
  cmd = _command(workdir, corpus_glob, data_dir)
  kinds = ["steps", "checkpoint write", "start-up"] * (KILLS // 3)
  for kind in kinds:
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _kill_moment(rng, workdir, proc, kind, launched)
    proc.kill()
    proc.wait()
  assert _logged_step(workdir) < STEPS
  proc = _run(cmd)
  assert proc.returncode == 0, proc.stderr
  assert _losses(workdir) == uninterrupted[1]


def _children(pid: int) -> list[int]:
  children = []
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      children.append(int(stat.split("/")[2]))
  return children


def _running(pid: int) -> bool:
  """Alive and not a zombie (an orphan's zombie stays until its new parent reaps it)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def test_kill_9_with_data_workers_leaves_no_worker_behind(tmp_path, corpus_glob, data_dir):
  """On the fly with data.num_workers=2: the grain worker processes end within seconds of a
  kill -9 of train.py (they used to live on for minutes, ~250 MB each)."""
  workdir = str(tmp_path)
  proc = subprocess.Popen(
      _command(workdir, corpus_glob, data_dir, "--config.data.prepared=False",
               "--config.data.num_workers=2", "--config.train.num_steps=100000"),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: _logged_step(workdir) >= 2, proc)
  children = _children(proc.pid)
  assert len(children) >= 2, children      # the two workers (and a resource tracker)
  proc.kill()
  proc.wait()
  deadline = time.time() + 20
  while time.time() < deadline and any(map(_running, children)):
    time.sleep(0.1)
  assert not any(map(_running, children)), [p for p in children if _running(p)]


def _corrupt_latest(workdir) -> int:
  latest = ckpt_lib.Checkpointer(workdir).latest_step()
  files = glob.glob(os.path.join(workdir, "checkpoints", str(latest), "state", "ocdbt*", "d", "*"))
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  return latest


def test_interrupted_and_corrupt_checkpoints_fall_back_to_the_previous_good_one(
    uninterrupted, tmp_path, corpus_glob, data_dir):
  """The finished run's last checkpoint (step 40) truncated by hand, and an uncommitted step
  folder as a kill during an async save leaves it: both are reported, step 35 is used."""
  done, losses = uninterrupted
  workdir = str(tmp_path / "copy")
  shutil.copytree(done, workdir)
  corrupt = _corrupt_latest(workdir)
  assert corrupt == STEPS
  os.makedirs(os.path.join(workdir, "checkpoints", "45.orbax-checkpoint-tmp-1234", "state"))
  proc = _run(_command(workdir, corpus_glob, data_dir))
  assert proc.returncode == 0, proc.stderr
  assert "ignoring incomplete checkpoint" in proc.stdout and "tmp-1234" in proc.stdout
  assert f"checkpoints/{corrupt} is corrupt" in proc.stdout
  assert f"resumed from step {STEPS - 5}" in proc.stdout
  assert _losses(workdir) == losses
  # The damaged step was kept aside and written again: a rerun has nothing left to do.
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", str(corrupt), "state"))
  assert ckpt_lib.Checkpointer(workdir).latest_step() == corrupt
  again = _run(_command(workdir, corpus_glob, data_dir))
  assert again.returncode == 0, again.stderr
  assert f"resumed from step {corrupt}" in again.stdout and "is corrupt" not in again.stdout


def test_nonfinite_losses_stop_the_run_with_a_report(tmp_path, corpus_glob, data_dir):
  """A learning rate of 1e12 blows the weights up after one update; every later step is
  non-finite and skipped, and the run stops after max_consecutive_nonfinite of them."""
  cmd = _command(str(tmp_path), corpus_glob, data_dir, "--config.train.learning_rate=1e12",
                 "--config.train.warmup_steps=0", "--config.train.min_learning_rate=0",
                 "--config.train.max_consecutive_nonfinite=3")
  proc = _run(cmd)
  assert proc.returncode == 1
  assert "non-finite loss/gradient at step" in proc.stderr and "3 in a row" in proc.stderr
  assert "update skipped" in proc.stdout


def test_no_checkpoint_inside_a_nonfinite_streak_so_a_rerun_stops_at_the_same_step(
    tiny, tmp_path, capsys):
  """The streak (steps 2..) spans the step-5 checkpoint: it is not written, so a rerun (an
  auto-requeue) resumes from before the streak and halts at the same step, not 8 steps later."""
  config = tiny(num_steps=40, checkpoint_every=5, learning_rate=1e12, warmup_steps=0,
                min_learning_rate=0, max_consecutive_nonfinite=8)
  for _ in range(2):
    with pytest.raises(loop.NonFiniteError, match="non-finite loss/gradient at step 9 "):
      loop.train(config, str(tmp_path))
    assert "not checkpointing inside a streak" in capsys.readouterr().out
    assert ckpt_lib.Checkpointer(str(tmp_path)).steps() == []


def test_a_failing_save_stops_the_run_and_keeps_earlier_checkpoints(tiny, tmp_path,
                                                                     monkeypatch):
  """Disk full during a save: a CheckpointError naming the directory; committed steps intact."""
  workdir = str(tmp_path)
  loop.train(tiny(num_steps=3, checkpoint_every=3), workdir)
  original = ckpt_lib.ocp.CheckpointManager.save

  def disk_full(self, step, *args, **kwargs):
    if step > 3:
      raise OSError(28, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", disk_full)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 6 in .*checkpoints failed.*"
                     r"No space left on device.*steps \[3\]"):
    loop.train(tiny(num_steps=9, checkpoint_every=3), workdir)
  monkeypatch.undo()
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.steps() == [3]
  s = setup_lib.setup(tiny())
  step, _, _ = checkpointer.restore_latest_good(s.abstract_state)
  assert step == 3


def test_a_failed_async_save_is_reported_under_its_own_step(tiny, tmp_path, monkeypatch):
  """The write of step 6 fails in the background (as a full disk does): the error, surfacing
  when step 9 is saved, names step 6, and says how to resume."""
  failed = []
  original_save = ckpt_lib.ocp.CheckpointManager.save
  original_wait = ckpt_lib.ocp.CheckpointManager.wait_until_finished

  def save(self, step, *args, **kwargs):
    if step == 6:
      failed.append(step)             # "started", fails in the background
      return True
    return original_save(self, step, *args, **kwargs)

  def wait(self):
    if failed:
      failed.clear()
      raise OSError(28, "No space left on device")
    return original_wait(self)

  monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "wait_until_finished", wait)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 6 in .* failed.*No space left.*"
                     r"steps \[3\]\. Free space .* resumes from step 3"):
    loop.train(tiny(num_steps=9, checkpoint_every=3), str(tmp_path))


def test_a_second_run_on_a_workdir_is_refused_and_a_killed_holder_leaves_no_lock(
    tmp_path, corpus_glob, data_dir):
  """While train.py runs, a second train.py on its workdir exits 2 at once naming the first's
  host and pid (it would otherwise resume from, and delete, the first's checkpoints); after a
  kill -9 of the first, the lock is free."""
  from polycom_jax.config_errors import ConfigError
  from polycom_jax.workdir_lock import WorkdirLock
  workdir = str(tmp_path / "run")
  first = subprocess.Popen(
      _command(workdir, corpus_glob, data_dir, "--config.train.num_steps=100000"), cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: _logged_step(workdir) >= 1, first)
    start = time.time()
    second = _run(_command(workdir, corpus_glob, data_dir))
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert "in use by another training run" in second.stderr
    assert time.time() - start < 60
    with pytest.raises(ConfigError, match=f"pid {first.pid}"):
      WorkdirLock(workdir).__enter__()
  finally:
    first.kill()
    first.wait()
  with WorkdirLock(workdir):                 # kill -9 released it: no error
    pass


def _pair(workdir, corpus_glob, data_dir, port):
  """train.py as two processes on localhost (one CPU device each, data parallel over both)."""
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               XLA_FLAGS=xla_flags(1))
    cmd = _command(workdir, corpus_glob, data_dir, "--config.train.num_steps=12",
                   "--config.train.checkpoint_every=0")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs, timeout=240):
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_sigterm_to_one_process_of_two_stops_both_at_the_same_step(tmp_path, corpus_glob,
                                                                      data_dir):
  """On a pod the hosts get the preemption notice at different moments: SIGTERM to process 1
  only. Both agree on the step, write that checkpoint together and exit 0; resuming on two
  processes gives the uninterrupted run's losses exactly."""
  whole = str(tmp_path / "whole")
  _finish(_pair(whole, corpus_glob, data_dir, _port()))
  workdir = str(tmp_path / "stopped")
  procs = _pair(workdir, corpus_glob, data_dir, _port())
  _wait_for(lambda: _logged_step(workdir) >= 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  (out0, _), _ = _finish(procs)
  steps = ckpt_lib.Checkpointer(workdir).steps()
  assert len(steps) == 1 and 3 <= steps[0] < 12, steps
  assert f"a stop on another process: checkpoint at step {steps[0]} written" in out0
  _finish(_pair(workdir, corpus_glob, data_dir, _port()))
  assert _losses(workdir) == _losses(whole)
