"""Evaluation: the validation loop, a checkpoint restored onto the current devices, samples."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import data as data_lib
from polycom_jax import metrics as metrics_lib
from polycom_jax import model as model_lib
from polycom_jax import paths
from polycom_jax import setup as setup_lib
from polycom_jax import steps as steps_lib
from polycom_jax.config_errors import ConfigError
from polycom_jax.setup import Setup


def evaluate(s: Setup, eval_step, params, batches: Iterable[dict]) -> dict:
  """Loss, perplexity, bits per byte and token count over the batches."""
  totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
  with jax.set_mesh(s.mesh):
    for local in batches:
      out = jax.device_get(eval_step(params, steps_lib.global_batch(s, local)))
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
  """This process's share of the validation batches (global batch_size rows each)."""
  return data_lib.make_eval_iterator(
      s.config.data, s.tokenizer, batch_size=batch_size // jax.process_count(),
      max_batches=max_batches, process_index=jax.process_index(),
      process_count=jax.process_count())


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                   devices=None) -> tuple[Setup, Any, int]:
  """(setup, params, step) for a workdir's checkpoint, resharded onto this run's mesh. Reads
  only: a workdir without checkpoints is an error, not a folder created."""
  s = setup_lib.setup(config, devices)
  if not paths.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise ConfigError(f"--workdir={workdir}: no checkpoint found "
                      f"({ckpt_lib.checkpoint_dir(workdir)} does not exist); is the path right?")
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  current = setup_lib.config_as_dict(config)
  try:
    if step is None:
      ckpt_lib.resolve_step(checkpointer, None)           # a clear error when there is none
      step, state, _ = checkpointer.restore_latest_good(s.abstract_state, current,
                                                         warn=metrics_lib.log)
    else:
      step = ckpt_lib.resolve_step(checkpointer, step)
      ckpt_lib.check_compatible(checkpointer.read_config(step), current)
      try:
        state, _ = checkpointer.restore(step, s.abstract_state)
      except Exception as e:
        raise ckpt_lib.CheckpointError(
            f"checkpoint {paths.join(checkpointer.directory, str(step))} is corrupt: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
  finally:
    checkpointer.close()
  return s, state["params"], step


def unigram_loss(s: Setup, num_train_batches: int, eval_max_batches: int) -> float:
  """Cross-entropy (nats/token) of a unigram model fit on training batches, on the eval batches:
  the floor a language model must beat to have learned anything beyond token frequencies."""
  counts = np.full(s.model_config.vocab_size, 0.5)            # add-1/2 smoothing
  it = data_lib.make_train_iterator(s.config.data, s.tokenizer, batch_size=s.per_process_batch,
                                    seed=s.config.data.shuffle_seed)
  for _ in range(num_train_batches):
    b = next(it)
    np.add.at(counts, b["targets"][b["loss_mask"] > 0], 1)
  it.close()
  logp = np.log(counts / counts.sum())
  nll, tokens = 0.0, 0.0
  for b in eval_batches(s, eval_max_batches, s.config.eval.batch_size):
    mask = b["loss_mask"] > 0
    nll -= logp[b["targets"][mask]].sum()
    tokens += mask.sum()
  return nll / max(tokens, 1)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None, with_unigram: bool = True) -> dict:
  """Validation loss, perplexity, bits/byte and tokens; written to eval/metrics_step_<N>.json."""
  s, params, step = restore_params(config, workdir, step)
  eval_step = steps_lib.make_eval_step(s)
  e = config.eval
  result = {"step": step, **evaluate(s, eval_step, params,
                                     eval_batches(s, e.max_batches, e.batch_size))}
  if with_unigram:
    result["unigram_loss"] = unigram_loss(s, num_train_batches=50, eval_max_batches=e.max_batches)
  if jax.process_index() == 0:
    out_dir = paths.join(paths.resolve(workdir, "--workdir"), "eval")
    path = paths.join(out_dir, f"metrics_step_{step}.json")
    try:
      paths.makedirs(out_dir)
      paths.write_text(path, json.dumps(result, indent=2))
      result["path"] = path
    except Exception as e:  # a read-only workdir or bucket: the numbers are printed all the same
      metrics_lib.log(f"warning: could not write {path} ({getattr(e, 'strerror', None) or e}); "
                      "the results are printed below only")
  return result


def generate(s: Setup, params, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0) -> str:
  """Continues prompt with the KV cache: greedy at temperature 0, else sampled. The prompt is
  conditioned as training sees a document: EOS (doubling as BOS) first, at position 0."""
  mc = s.model_config
  prompt_ids = s.tokenizer.encode(prompt)
  keep = mc.max_seq_len - 2                  # room for the start token and one new token
  ids = [s.tokenizer.eos_id] + prompt_ids[max(0, len(prompt_ids) - keep):]
  total = min(len(ids) + max_new_tokens, mc.max_seq_len)
  @jax.jit
  def forward(params, tokens, cache, index):
    return nnx.merge(s.graphdef, params)(tokens, cache=cache, cache_index=index)

  def pick(logits, key):
    if temperature <= 0:
      return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, logits / temperature, axis=-1)

  cache = model_lib.init_cache(mc, batch=1, max_len=total)
  logits, cache = forward(params, jnp.asarray([ids], jnp.int32), cache, jnp.int32(0))
  key = jax.random.key(seed)
  out, pos = [], len(ids)
  while pos < total:
    key, sub = jax.random.split(key)
    token = int(pick(logits[0, -1, :s.tokenizer.vocab_size], sub))
    if token == s.tokenizer.eos_id:
      break
    out.append(token)
    logits, cache = forward(params, jnp.asarray([[token]], jnp.int32), cache, jnp.int32(pos))
    pos += 1
  return s.tokenizer.decode(out)


def format_summary(result: dict) -> str:
  lines = [f"step {result['step']}: loss {result['loss']:.4f} nats/token, "
           f"perplexity {result['perplexity']:.3f}, {result['tokens']:,} tokens"]
  if "bits_per_byte" in result:
    lines.append(f"bits per byte {result['bits_per_byte']:.4f}")
  if "unigram_loss" in result:
    u = result["unigram_loss"]
    lines.append(f"unigram baseline loss {u:.4f} nats/token (perplexity {math.exp(u):.2f}): "
                 f"the model is {u - result['loss']:.3f} nats/token below it")
  if "path" in result:
    lines.append(f"written to {result['path']}")
  return "\n".join(lines)
