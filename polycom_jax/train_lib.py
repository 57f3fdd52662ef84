"""Train state, jitted train/eval steps, and the training loop with checkpoints and metrics.

The state is a plain pytree {"step", "params", "opt_state"} (params: the model's nnx.State of
Params), so jit shardings, Orbax checkpoints and optax all see the same tree. The model is
rebuilt from a static graphdef inside each step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import data as data_lib
from polycom_jax import metrics as metrics_lib
from polycom_jax import model as model_lib
from polycom_jax import moe as moe_lib
from polycom_jax import optimizer as opt_lib
from polycom_jax import sharding as sharding_lib
from polycom_jax.config_errors import ConfigError, require

NONFINITE_POLICIES = ("skip", "halt")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient and the policy says stop."""


# ------------------------------------------------------------------------------------------------
# Setup: everything derived from the config before anything compiles.

@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  model_config: model_lib.ModelConfig
  mesh: Mesh
  rules: tuple
  tokenizer: Any
  graphdef: Any
  tx: optax.GradientTransformation
  state_shardings: Any
  abstract_state: Any        # ShapeDtypeStructs with shardings: the restore target

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding_lib.batch_sharding(self.mesh, self.rules)

  @property
  def per_process_batch(self) -> int:
    return self.config.train.global_batch_size // jax.process_count()


def validate_config(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """Checks every training field and the model config; returns the resolved ModelConfig."""
  mc = model_lib.ModelConfig.from_config(config.model)
  t = config.train
  for name in ("num_steps", "global_batch_size", "log_every"):
    require(t[name] > 0, f"config.train.{name}", f"must be > 0, got {t[name]}")
  for name in ("checkpoint_every", "eval_every", "eval_batches", "warmup_steps",
               "micro_batch_size", "weight_decay", "grad_clip", "z_loss"):
    require(t[name] >= 0, f"config.train.{name}", f"must be >= 0, got {t[name]}")
  require(t.learning_rate > 0, "config.train.learning_rate", f"must be > 0, got {t.learning_rate}")
  require(0 <= t.min_learning_rate <= t.learning_rate, "config.train.min_learning_rate",
          f"must be in [0, learning_rate={t.learning_rate}], got {t.min_learning_rate}")
  require(t.keep_checkpoints >= 1, "config.train.keep_checkpoints",
          f"must be >= 1, got {t.keep_checkpoints}")
  if t.micro_batch_size:
    require(t.global_batch_size % t.micro_batch_size == 0, "config.train.micro_batch_size",
            f"({t.micro_batch_size}) must divide config.train.global_batch_size "
            f"({t.global_batch_size})")
  require(t.nonfinite_policy in NONFINITE_POLICIES, "config.train.nonfinite_policy",
          f"must be one of {NONFINITE_POLICIES}, got {t.nonfinite_policy!r}")
  require(config.data.seq_len > 1, "config.data.seq_len", f"must be > 1, got {config.data.seq_len}")
  require(config.data.seq_len <= mc.max_seq_len, "config.data.seq_len",
          f"({config.data.seq_len}) is longer than config.model.max_seq_len ({mc.max_seq_len})")
  return mc


def check_batch_divisible(batch: int, field: str, mesh: Mesh, rules):
  dp = sharding_lib.data_parallel_size(mesh, rules)
  require(batch % dp == 0, field,
          f"({batch}) must be divisible by the data-parallel size {dp} "
          f"(mesh {dict(mesh.shape)}, batch rows split over {dict(rules)['batch']})")
  require(batch % jax.process_count() == 0, field,
          f"({batch}) must be divisible by the number of processes ({jax.process_count()})")


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Validates the config, builds the mesh, tokenizer and abstract state. Compiles nothing."""
  mc = validate_config(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.rules_from_config(config.mesh)
  t = config.train
  check_batch_divisible(t.global_batch_size, "config.train.global_batch_size", mesh, rules)
  if t.micro_batch_size:
    check_batch_divisible(t.micro_batch_size, "config.train.micro_batch_size", mesh, rules)
  check_batch_divisible(config.eval.batch_size, "config.eval.batch_size", mesh, rules)
  tokenizer = data_lib.get_tokenizer(config.data)
  require(tokenizer.vocab_size <= mc.vocab_size, "config.model.vocab_size",
          f"({mc.vocab_size}) is smaller than the tokenizer's vocabulary "
          f"({tokenizer.vocab_size}, config.data.tokenizer={config.data.tokenizer!r})")
  tx = opt_lib.make_optimizer(t)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.Transformer(mc, nnx.Rngs(0))))
  abstract = jax.eval_shape(_init_fn(mc, tx, config.seed))
  shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Setup(config, mc, mesh, rules, tokenizer, graphdef, tx, shardings, abstract)


def _init_fn(mc: model_lib.ModelConfig, tx, seed: int) -> Callable[[], dict]:
  def init():
    params = nnx.state(model_lib.Transformer(mc, nnx.Rngs(seed)), nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  return init


def init_state(s: Setup) -> dict:
  """Fresh state, created directly in its sharded layout (never whole on one device)."""
  with jax.set_mesh(s.mesh):
    return jax.jit(_init_fn(s.model_config, s.tx, s.config.seed),
                   out_shardings=s.state_shardings)()


# ------------------------------------------------------------------------------------------------
# Steps

def _token_nll(graphdef, params, batch: dict, mc: model_lib.ModelConfig):
  """Per-token negative log-likelihood [B, T] and log-partition [B, T], in float32, and the
  MoE router's auxiliary losses ({} for dense models)."""
  model = nnx.merge(graphdef, params)
  doc = mc.document_mask
  logits = model(batch["inputs"], positions=batch["positions"] if doc else None,
                 segment_ids=batch["segment_ids"] if doc else None)          # [B, T, V]
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  return logz - target_logit, logz, moe_lib.aux_losses(model)


def make_train_step(s: Setup) -> Callable[[dict, dict], tuple[dict, dict]]:
  """jit(state, batch) -> (state, metrics); gradient accumulation over micro-batches, global
  norm, and a non-finite guard that leaves params and optimizer state untouched."""
  t, mc, graphdef, tx = s.config.train, s.model_config, s.graphdef, s.tx
  schedule = opt_lib.learning_rate_schedule(t)
  accum = t.global_batch_size // t.micro_batch_size if t.micro_batch_size else 1

  def loss_sum(params, batch, total_tokens):
    """This (micro-)batch's share of the global objective, and its (nll sum, aux losses)."""
    nll, logz, aux = _token_nll(graphdef, params, batch, mc)
    mask = batch["loss_mask"]
    loss = jnp.sum(nll * mask)
    if t.z_loss:
      loss += t.z_loss * jnp.sum(jnp.square(logz) * mask)
    loss = loss / total_tokens
    if aux:   # router losses are means per micro-batch: average them over micro-batches
      loss += (mc.moe_aux_loss_weight * aux["load_balance"]
               + mc.moe_z_loss_weight * aux["router_z"]) / accum
    return loss, (jnp.sum(nll * mask), aux)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step(state, batch):
    params = state["params"]
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    if accum == 1:
      (_, (nll_sum, aux)), grads = grad_fn(params, batch, total_tokens)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

      def body(carry, mb):
        (_, (n, a)), g = grad_fn(params, mb, total_tokens)
        return jax.tree.map(jnp.add, carry, (g, n, a)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      aux0 = {k: jnp.zeros(()) for k in ("load_balance", "router_z")} if mc.num_experts else {}
      (grads, nll_sum, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), aux0), micro)
      aux = {k: v / accum for k, v in aux.items()}
    loss = nll_sum / total_tokens
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                 "opt_state": keep(new_opt, state["opt_state"])}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": total_tokens, "nonfinite": ~finite, **aux}
    coefficients = activation_coefficients(new_state["params"])
    if coefficients is not None:
      metrics["coefficients"] = coefficients
    return new_state, metrics

  return jax.jit(sharding_lib.with_activation_sharding(step, s.mesh, s.rules),
                 in_shardings=(s.state_shardings, s.batch_sharding),
                 out_shardings=(s.state_shardings, None), donate_argnums=0)


def make_eval_step(s: Setup) -> Callable[[Any, dict], dict]:
  """jit(params, batch) -> sums of nll, tokens and bytes (for loss, perplexity, bits/byte)."""
  byte_lengths = np.zeros(s.model_config.vocab_size, np.float32)
  lengths = np.asarray(s.tokenizer.token_byte_lengths(), np.float32)
  byte_lengths[:len(lengths)] = lengths
  byte_lengths = jnp.asarray(byte_lengths)

  def step(params, batch):
    nll, _, _ = _token_nll(s.graphdef, params, batch, s.model_config)
    mask = batch["loss_mask"]
    return {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask),
            "bytes": jnp.sum(byte_lengths[batch["targets"]] * mask)}

  return jax.jit(sharding_lib.with_activation_sharding(step, s.mesh, s.rules),
                 in_shardings=(s.state_shardings["params"], s.batch_sharding))


def global_batch(s: Setup, local: dict) -> dict:
  """Assembles the global batch from this process's rows (each process reads only its part)."""
  return {k: jax.make_array_from_process_local_data(s.batch_sharding, np.asarray(local[k]))
          for k in BATCH_KEYS}


def evaluate(s: Setup, eval_step, params, batches: Iterable[dict]) -> dict:
  """Loss, perplexity, bits per byte and token count over the batches."""
  totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
  with jax.set_mesh(s.mesh):
    for local in batches:
      out = jax.device_get(eval_step(params, global_batch(s, local)))
      for k in totals:
        totals[k] += float(out[k])
  if hasattr(batches, "close"):
    batches.close()                  # grain worker processes and their shared memory
  tokens = max(totals["tokens"], 1.0)
  loss = totals["nll"] / tokens
  result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(totals["tokens"])}
  if totals["bytes"] > 0:
    result["bits_per_byte"] = totals["nll"] / math.log(2) / totals["bytes"]
  return result


def eval_batches(s: Setup, max_batches: int, batch_size: int) -> Iterator[dict]:
  return data_lib.make_eval_iterator(
      s.config.data, s.tokenizer, batch_size=batch_size // jax.process_count(),
      max_batches=max_batches, process_index=jax.process_index(),
      process_count=jax.process_count())


# ------------------------------------------------------------------------------------------------
# The loop

def activation_coefficients(params) -> jax.Array | None:
  """[layers, r + 1]: each layer's shared PolyCom coefficients (weight..., bias), or None for
  other activations; logged to follow how the mix of powers evolves during training."""
  layers = params["layers"]
  if isinstance(layers, nnx.State) and "mlp" in layers:      # scan_layers: arrays [layers, ...]
    act = layers["mlp"].get("act")
    if act is None or "weight" not in act:
      return None
    return jnp.concatenate([act["weight"][...], act["bias"][...]], axis=-1)
  rows = []
  for i in sorted(layers, key=int):
    act = layers[i]["mlp"].get("act")
    if act is None or "weight" not in act:
      return None
    rows.append(jnp.concatenate([act["weight"][...], act["bias"][...]]))
  return jnp.stack(rows)


def check_workdir(workdir: str):
  """The workdir exists (created if needed) and is writable, or a ConfigError says why."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable: {e}") from None


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


class _StopRequest:
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


def log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint if any); returns the last metrics."""
  s = setup(config)
  check_workdir(workdir)
  data_lib.check_data_config(config.data)
  t = config.train
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  config_dict = config_as_dict(config)
  train_iter = data_lib.make_train_iterator(
      config.data, s.tokenizer, batch_size=s.per_process_batch, seed=config.data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count())

  if checkpointer.steps():
    start, state, data_state = checkpointer.restore_latest_good(s.abstract_state, config_dict,
                                                                warn=log)
    if data_state is None:
      log(f"warning: the step-{start} checkpoint was written by a different number of "
          "processes; each process's data position cannot carry over, so the data iterators "
          "start again from the beginning of their shards")
    else:
      train_iter.set_state(data_state)
    log(f"resumed from step {start} in {checkpointer.directory}")
  else:
    state, start = init_state(s), 0
    log(f"initialised {model_lib.num_params(s.model_config):,} parameters "
        f"({s.model_config.activation}, mesh {dict(s.mesh.shape)})")

  train_step, eval_step = make_train_step(s), make_eval_step(s)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  coefficient_writer = metrics_lib.MetricWriter(workdir, "coefficients.jsonl", resume_step=start,
                                                tensorboard=False)
  progress = metrics_lib.Progress(t.num_steps, start)
  flops_per_token = model_lib.flops_per_token(s.model_config, config.data.seq_len)
  device_kind = jax.devices()[0].device_kind
  tokens_per_step = t.global_batch_size * config.data.seq_len
  last: dict = {}
  consecutive_bad, skipped = 0, 0
  window_start, window_first = time.time(), start

  def save(step_done: int, force: bool = False):
    if step_done not in checkpointer.steps():
      checkpointer.save(step_done, state, train_iter.get_state(), config_dict, force=force)

  def after_step(step: int, step_metrics: dict):
    """Non-finite policy, logging and evaluation for a finished step."""
    nonlocal consecutive_bad, skipped, window_start, window_first, last
    m = jax.device_get(step_metrics)
    if m["nonfinite"]:
      skipped += 1
      consecutive_bad += 1
      if t.nonfinite_policy == "halt" or consecutive_bad >= t.max_consecutive_nonfinite:
        checkpointer.close()
        raise NonFiniteError(
            f"non-finite loss/gradient at step {step} (loss={m['loss']}, grad_norm="
            f"{m['grad_norm']}; {consecutive_bad} in a row, policy {t.nonfinite_policy!r}); "
            f"the data iterator is now at {train_iter.get_state()!r}. "
            f"The last checkpoint is step {checkpointer.latest_step()}.")
      log(f"step {step}: non-finite loss/gradient, update skipped ({consecutive_bad} in a row)")
    else:
      consecutive_bad = 0
    if step % t.log_every and step != t.num_steps:
      return
    elapsed, steps_done = time.time() - window_start, step - window_first
    tps = tokens_per_step * steps_done / max(elapsed, 1e-9)
    last = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "tokens_per_sec": tps, "step_time": elapsed / max(steps_done, 1),
            "skipped_updates": skipped, "tokens_seen": step * tokens_per_step,
            "mfu": metrics_lib.mfu(flops_per_token, tps, jax.device_count(), device_kind),
            **{f"moe_{k}": float(m[k]) for k in ("load_balance", "router_z") if k in m}}
    if eval_due(step):
      ev = evaluate(s, eval_step, state["params"],
                    eval_batches(s, t.eval_batches, config.eval.batch_size))
      last.update({f"eval_{k}": v for k, v in ev.items() if k != "tokens"})
    window_start, window_first = time.time(), step
    writer.write(step, last)
    if "coefficients" in m:
      coefficient_writer.write(step, {"layers": m["coefficients"].tolist()})
    log(progress.line(step, last))

  def eval_due(step: int) -> bool:
    return bool(t.eval_every) and (step % t.eval_every == 0 or step == t.num_steps)

  # Step t's metrics are read after step t+1 is dispatched, so the host never idles the devices;
  # steps that evaluate or checkpoint are handled at once (they use that step's state).
  with _StopRequest() as stop, jax.set_mesh(s.mesh):
    step, pending = start, None
    while step < t.num_steps:
      batch = global_batch(s, next(train_iter))
      state, step_metrics = train_step(state, batch)
      step += 1
      if pending is not None:
        after_step(*pending)
      pending = (step, step_metrics)
      if eval_due(step) or step == t.num_steps or stop.signum is not None or (
          t.checkpoint_every and step % t.checkpoint_every == 0):
        after_step(*pending)
        pending = None
      if t.checkpoint_every and step % t.checkpoint_every == 0:
        save(step)
      if stop.signum is not None:
        save(step, force=True)
        checkpointer.close()
        writer.close()
        coefficient_writer.close()
        train_iter.close()
        log(f"received signal {stop.signum}: checkpoint at step {step} written; "
            f"run the same command to resume")
        return {"step": step, "preempted": True, **last}
    save(step, force=True)
  checkpointer.close()
  writer.close()
  coefficient_writer.close()
  train_iter.close()      # stops grain's worker processes and frees their shared memory
  log(f"done: step {step}, checkpoints in {checkpointer.directory}, "
      f"metrics in {os.path.join(workdir, 'metrics.jsonl')}")
  return {"step": step, **last}
