"""Training loop, checkpoints, resume and evaluation on a tiny model (CPU, seconds)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import data as data_lib
from polycom_jax import evaluation, loop
from polycom_jax import setup as setup_lib
from polycom_jax import steps as steps_lib
from polycom_jax.config_errors import ConfigError
from conftest import jaxpr_eqns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_glob, data_dir):
  """Six steps with checkpoints at 3 and 6, and an evaluation at the end."""
  from conftest import tiny_config
  config = tiny_config(corpus_glob, data_dir, eval_every=6)
  workdir = str(tmp_path_factory.mktemp("run"))
  result = loop.train(config, workdir)
  return config, workdir, result


def test_training_reduces_loss(tiny, tmp_path):
  config = tiny(num_steps=40, log_every=5, checkpoint_every=0, warmup_steps=5)
  loop.train(config, str(tmp_path))
  losses = _losses(str(tmp_path))
  assert losses[40] < losses[5] - 1.0, losses


def test_run_writes_metrics_and_checkpoints(finished_run):
  _, workdir, result = finished_run
  assert sorted(_losses(workdir)) == [1, 2, 3, 4, 5, 6]
  assert ckpt_lib.Checkpointer(workdir).steps() == [3, 6]
  assert result["step"] == 6 and np.isfinite(result["eval_loss"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    record = json.loads(f.readline())
  for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "mfu"):
    assert key in record
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_throughput_is_measured_after_the_first_step(finished_run):
  """The first step's time is mostly compilation: the first record (log_every=1) reports no
  tokens/s or MFU, the later ones measure steps 2.. only."""
  _, workdir, _ = finished_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert records[0]["step"] == 1 and records[0]["tokens_per_sec"] is None
  assert all(r["tokens_per_sec"] > 0 for r in records[1:])


def test_generate_conditions_on_the_start_token_like_training(setup_and_batch):
  """Greedy generate() equals the argmax continuation of [EOS] + prompt under the uncached
  forward (training puts EOS, doubling as BOS, before every document)."""
  s, _ = setup_and_batch
  with jax.set_mesh(s.mesh):
    params = setup_lib.init_state(s)["params"]
  forward = jax.jit(lambda p, x: nnx.merge(s.graphdef, p)(x))
  prompt = "def main("
  seq = [s.tokenizer.eos_id] + s.tokenizer.encode(prompt)
  expected = []
  for _ in range(6):
    token = int(jnp.argmax(forward(params, jnp.asarray([seq]))[0, -1, :s.tokenizer.vocab_size]))
    if token == s.tokenizer.eos_id:
      break
    expected.append(token)
    seq.append(token)
  got = evaluation.generate(s, params, prompt, max_new_tokens=6)
  assert got == s.tokenizer.decode(expected)


def test_resume_reproduces_the_uninterrupted_losses(finished_run, tmp_path):
  """Restart from the step-3 checkpoint: steps 4..6 see the same batches and give the same
  losses, bit for bit, as the run that never stopped."""
  config, workdir, _ = finished_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  loop.train(config, resumed)
  expected = _losses(workdir)
  assert _losses(resumed) == {k: expected[k] for k in (4, 5, 6)}


def test_resume_with_another_corpus_is_refused_naming_the_field(finished_run, tmp_path):
  """A run resumed with other data settings: one ConfigError naming the field, before any
  compile, and the checkpoints are left as they were."""
  config, workdir, _ = finished_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  other = config.copy_and_resolve_references()
  other.data.text_glob = other.data.text_glob.replace("*.txt", "*.py.txt")
  with pytest.raises(ConfigError, match=r"config.data.text_glob is .* but the step-6 "
                                        "checkpoint was trained with"):
    loop.train(other, resumed)
  assert ckpt_lib.Checkpointer(resumed).steps() == [3, 6]


def test_eval_of_restored_checkpoint_equals_eval_at_end_of_training(finished_run):
  config, workdir, result = finished_run
  out = evaluation.evaluate_checkpoint(config, workdir, with_unigram=False)
  assert out["step"] == 6
  np.testing.assert_allclose(out["loss"], result["eval_loss"], rtol=1e-6)
  with open(os.path.join(workdir, "eval", "metrics_step_6.json")) as f:
    written = json.load(f)
  for key in ("step", "loss", "perplexity", "bits_per_byte", "tokens"):
    assert key in written
  assert written["tokens"] > 0 and written["perplexity"] == pytest.approx(np.exp(out["loss"]))


def test_checkpoint_roundtrip_is_bit_identical(tiny, tmp_path):
  s = setup_lib.setup(tiny())
  state = setup_lib.init_state(s)
  step = steps_lib.make_train_step(s)
  it = data_lib.make_train_iterator(s.config.data, s.tokenizer, batch_size=8, seed=0)
  with jax.set_mesh(s.mesh):
    for _ in range(2):
      state, _ = step(state, steps_lib.global_batch(s, next(it)))
  saved = jax.device_get(state)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(2, state, it.get_state(), {"model": {}})
  checkpointer.wait()
  restored, data_state = checkpointer.restore(2, s.abstract_state)
  checkpointer.close()
  assert data_state == json.loads(json.dumps(it.get_state()))
  flat_a, tree_a = jax.tree.flatten(saved)
  flat_b, tree_b = jax.tree.flatten(jax.device_get(restored))
  assert tree_a == tree_b
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def setup_and_batch(corpus_glob, data_dir):
  from conftest import tiny_config
  s = setup_lib.setup(tiny_config(corpus_glob, data_dir))
  it = data_lib.make_train_iterator(s.config.data, s.tokenizer, batch_size=8, seed=0)
  return s, next(it)


def _check_accumulation_equals_the_full_batch(s, s_accum, state, batch):
  """One step of the unsplit batch and one accumulated over micro-batches: same loss, gradient
  norm and parameters."""
  full, m_full = steps_lib.make_train_step(s)(state, steps_lib.global_batch(s, batch))
  acc, m_acc = steps_lib.make_train_step(s_accum)(setup_lib.init_state(s_accum),
                                                  steps_lib.global_batch(s, batch))
  np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(acc["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_weights_micro_batches_by_their_tokens(setup_and_batch, tiny):
  """Gradient accumulation equals the unsplit batch, on micro-batches with very different
  loss_mask sums (each micro-batch's nll sum over the global token count). A mean of per-micro-batch
  means would give the 3-token micro-batch the weight of a full one, checked to differ here."""
  s, batch = setup_and_batch
  mask = np.array(batch["loss_mask"])
  mask[:2] = 0.0
  mask[:2, :3] = 1.0                   # micro-batch 0 (rows 0-1): 6 tokens; the others: full rows
  batch = dict(batch, loss_mask=mask)
  s_accum = setup_lib.setup(tiny(micro_batch_size=2))
  with jax.set_mesh(s.mesh):
    state = setup_lib.init_state(s)

    def mean_loss(p, b):
      nll, _, _ = steps_lib.token_nll(s.graphdef, p, b, s.model_config)
      return jnp.sum(nll * b["loss_mask"]) / jnp.sum(b["loss_mask"])

    micro = [{k: jnp.asarray(v[i:i + 2]) for k, v in batch.items()} for i in range(0, 8, 2)]
    grad = jax.jit(jax.grad(mean_loss))
    grads = [grad(state["params"], mb) for mb in micro]
    mean_of_means = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    unsplit = grad(state["params"], {k: jnp.asarray(v) for k, v in batch.items()})
    # Adam's first step moves each parameter by about lr * sign(gradient): gradients this far
    # apart flip many signs, so the parameter check below tells the two apart.
    wrong = optax.tree.norm(jax.tree.map(jnp.subtract, mean_of_means, unsplit))
    assert float(wrong) > 0.1 * float(optax.tree.norm(unsplit))          # the test can fail
    _check_accumulation_equals_the_full_batch(s, s_accum, state, batch)


def test_chunked_loss_equals_the_whole_one_and_never_holds_the_logits(setup_and_batch):
  """The loss a chunk of 8 positions at a time (the tiny rows have 32), with padding and a
  z-loss: nll and log-partition equal the unchunked ones to float32 rounding (bit for bit op
  by op; compiled, XLA fuses the two programs differently: ~1 ulp in a few entries),
  gradients too (the chunks' contributions add up in another order), and neither pass makes
  a [B, T, V] array (the whole logits)."""
  s, batch = setup_and_batch
  mask = np.array(batch["loss_mask"])
  mask[0, 20:] = 0.0                                        # padding in one row
  batch = {k: jnp.asarray(v) for k, v in dict(batch, loss_mask=mask).items()}
  with jax.set_mesh(s.mesh):
    params = setup_lib.init_state(s)["params"]

  def loss(p, chunk):
    nll, logz, _ = steps_lib.token_nll(s.graphdef, p, batch, s.model_config, chunk)
    m = batch["loss_mask"]
    return jnp.sum(nll * m) / jnp.sum(m) + 1e-2 * jnp.sum(jnp.square(logz) * m), (nll, logz)

  assert steps_lib.loss_chunk_len(32, 8) == 8 and steps_lib.loss_chunk_len(32, 12) == 8
  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (whole, (nll0, logz0)), g0 = value_and_grad(params, 0)
  (chunked, (nll1, logz1)), g1 = value_and_grad(params, 8)
  np.testing.assert_allclose(nll1, nll0, rtol=1e-6)
  np.testing.assert_allclose(logz1, logz0, rtol=1e-6)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))
  b_, t = batch["inputs"].shape
  full = (b_, t, s.model_config.vocab_size)

  def shapes(chunk):
    program = jax.make_jaxpr(jax.grad(lambda p: loss(p, chunk)[0]))(params)
    return {tuple(v.aval.shape) for eqn in jaxpr_eqns(program.jaxpr) for v in eqn.outvars
            if hasattr(v.aval, "shape")}

  assert full in shapes(0)                                  # the check can fail
  assert full not in shapes(8)


def test_nonfinite_batch_leaves_state_untouched(setup_and_batch):
  s, batch = setup_and_batch
  poisoned = dict(batch, loss_mask=np.where(np.arange(batch["loss_mask"].size).reshape(
      batch["loss_mask"].shape) == 5, np.nan, batch["loss_mask"]).astype(np.float32))
  with jax.set_mesh(s.mesh):
    state = setup_lib.init_state(s)
    before = jax.device_get(state)
    after, metrics = steps_lib.make_train_step(s)(state, steps_lib.global_batch(s, poisoned))
  assert bool(metrics["nonfinite"])
  after = jax.device_get(after)
  assert int(after["step"]) == 1
  for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                  jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"])):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_from_another_model_is_refused(finished_run):
  config, workdir, _ = finished_run
  other = config.copy_and_resolve_references()
  other.model.activation = "swiglu"
  with pytest.raises(ConfigError, match=r"config\.model\.activation: checkpoint has 'polynorm'"):
    loop.train(other, workdir)
  with pytest.raises(ConfigError, match=r"config\.model\.activation"):
    evaluation.evaluate_checkpoint(other, workdir)
  scanned = config.copy_and_resolve_references()
  scanned.model.scan_layers = True            # stacked parameters: another layout
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers: checkpoint has False"):
    evaluation.evaluate_checkpoint(scanned, workdir)


def test_eval_errors_name_the_problem(finished_run, tmp_path):
  config, workdir, _ = finished_run
  with pytest.raises(ConfigError, match="no checkpoint found"):
    evaluation.evaluate_checkpoint(config, str(tmp_path))
  with pytest.raises(ConfigError, match="is the path right"):     # a mistyped workdir...
    evaluation.evaluate_checkpoint(config, str(tmp_path / "typo"))
  assert not os.path.exists(tmp_path / "typo")                       # ...is not created
  with pytest.raises(ConfigError, match=r"--step=4.*available steps: \[3, 6\]"):
    evaluation.evaluate_checkpoint(config, workdir, step=4)


def test_eval_on_a_read_only_workdir_still_returns_the_numbers(finished_run, monkeypatch,
                                                               capsys):
  """Writing eval/metrics_step_N.json fails (tests run as root, so the failure is injected):
  the evaluation's result is returned (and eval.py prints it), with a warning."""
  config, workdir, result = finished_run
  real_mkstemp = tempfile.mkstemp

  def read_only(*args, dir=None, **kwargs):           # paths.write_text's temporary file
    if "/eval" in str(dir):
      raise PermissionError(13, "Permission denied", str(dir))
    return real_mkstemp(*args, dir=dir, **kwargs)
  monkeypatch.setattr("tempfile.mkstemp", read_only)
  out = evaluation.evaluate_checkpoint(config, workdir, with_unigram=False)
  assert "path" not in out and out["loss"] == pytest.approx(result["eval_loss"], rel=1e-6)
  assert "could not write" in capsys.readouterr().out


@pytest.mark.parametrize("field, value, message", [
    ("model.vocab_size", 128, r"config\.model\.vocab_size \(128\) is smaller than the tokenizer"),
    ("data.seq_len", 100, r"config\.data\.seq_len \(100\) is longer than config\.model\.max_seq_len"),
    ("train.micro_batch_size", 3, r"config\.train\.micro_batch_size \(3\) must divide"),
    ("model.mlp_chunk", 5, r"config\.model\.mlp_chunk \(5\) must divide config\.data\.seq_len"),
    ("train.nonfinite_policy", "ignore", r"config\.train\.nonfinite_policy"),
    ("train.b1", 1.5, r"config\.train\.b1 must be in \[0, 1\), got 1.5"),
    ("train.b2", 1.0, r"config\.train\.b2 must be in \[0, 1\)"),
    ("train.adam_eps", 0.0, r"config\.train\.adam_eps must be > 0"),
    ("train.weight_decay_rule", "adam", r"config\.train\.weight_decay_rule must be one of"),
    ("mesh.tensor", 2, r"config\.mesh: .*tensor=2.* does not divide the 1 devices found"),
])
def test_bad_config_fails_before_compiling(tiny, field, value, message):
  config = tiny()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    setup_lib.setup(config)


def test_a_restart_loads_its_steps_from_the_compilation_cache(tiny, tmp_path, monkeypatch):
  """On by default, under WORKDIR/compilation_cache: the first run fills it, a second run
  (another workdir pointed at the same cache) compiles nothing that the first did: every
  compile request that uses the cache is a hit."""
  from jax._src import monitoring  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache
  from polycom_jax import compile_cache
  events = []
  listener = lambda name, **_: events.append(name)
  monitoring.register_event_listener(listener)
  before = jax.config.jax_compilation_cache_dir     # `make test` points JAX at .jax_cache
  try:
    monkeypatch.delenv("POLYCOM_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    first = tmp_path / "first"
    config = tiny(num_steps=2, checkpoint_every=0)
    loop.train(config, str(first))
    cache = first / "compilation_cache"
    assert cache.is_dir() and len(list(cache.iterdir())) >= 2       # train and eval steps
    events.clear()
    monkeypatch.setenv("POLYCOM_COMPILATION_CACHE", str(cache))
    loop.train(config, str(tmp_path / "second"))
    requests = events.count("/jax/compilation_cache/compile_requests_use_cache")
    hits = events.count("/jax/compilation_cache/cache_hits")
    assert requests >= 2 and hits == requests, (requests, hits)
    assert compile_cache.cache_dir("w") == str(cache)
    monkeypatch.setenv("POLYCOM_COMPILATION_CACHE", "off")
    assert compile_cache.cache_dir("w") is None
  finally:
    monitoring.unregister_event_listener(listener)
    compilation_cache.set_cache_dir(before)
    compilation_cache.reset_cache()


def test_unwritable_workdir_is_refused(tiny, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match="not writable"):
    loop.train(tiny(), str(blocker / "run"))


def test_generate_continues_a_prompt(finished_run):
  config, workdir, _ = finished_run
  s, params, _ = evaluation.restore_params(config, workdir)
  text = evaluation.generate(s, params, "def ", max_new_tokens=8)
  greedy_again = evaluation.generate(s, params, "def ", max_new_tokens=8)
  assert isinstance(text, str) and text == greedy_again
  assert len(text.encode("utf-8", errors="replace")) <= 8 * 4


def test_train_cli_reports_config_errors_cleanly(tmp_path):
  proc = subprocess.run(
      [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={tmp_path}",
       "--config.model.activation=polynom"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert "unknown activation 'polynom'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nonexist.py"], r"^error: --config=configs/nonexist.py: OSError: .*No "
                                       r"such file"),
    (["--config={bad}"], r"^error: SyntaxError: invalid syntax \(bad_config.py, line 1\)"),
    (["--config.train.num_stepz=3"], r"^error: 'num_stepz' Did you mean \"num_steps\""),
    (["--bogus_flag"], r"^error: Unknown command line flag 'bogus_flag'"),
], ids=["missing_config_file", "config_syntax_error", "typo_in_override", "unknown_flag"])
def test_entry_points_report_bad_command_lines_in_one_line(tmp_path, args, message):
  """absl parses the command line before any handler runs: these were 45-line tracebacks."""
  bad = tmp_path / "bad_config.py"
  bad.write_text("def get_config(:\n")
  args = [a.format(bad=bad) for a in args]
  if not any(a.startswith("--config=") for a in args):
    args.insert(0, "--config=configs/default.py")
  proc = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'w'}", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  errors = [line for line in proc.stderr.splitlines() if not line.startswith(("W1", "I1"))]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert re.match(message, errors[0]), errors[0]
  assert not os.path.exists(tmp_path / "w")
