"""The loss and the jitted train and eval steps, and the global batch they take."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from polycom_jax import model as model_lib
from polycom_jax import moe as moe_lib
from polycom_jax import optimizer as opt_lib
from polycom_jax import param_layouts
from polycom_jax import sharding as sharding_lib
from polycom_jax.setup import Setup

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def loss_chunk_len(seq_len: int, loss_chunk: int) -> int:
  """Tokens per loss chunk: the largest divisor of seq_len that is <= loss_chunk (0: all)."""
  if not loss_chunk or loss_chunk >= seq_len:
    return seq_len
  return max(c for c in range(1, loss_chunk + 1) if seq_len % c == 0)


def _head_nll(x: jax.Array, head: jax.Array, targets: jax.Array):
  """nll and log-partition [B, C] (float32) of hidden states x [B, C, D] under head [D, V]."""
  logits = model_lib.head_logits(x, head)                                      # [B, C, V]
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - target_logit, logz


def token_nll(graphdef, params, batch: dict, mc: model_lib.ModelConfig, loss_chunk: int = 0):
  """Per-token negative log-likelihood [B, T] and log-partition [B, T], in float32, and the
  MoE router's auxiliary losses ({} for dense models).

  With loss_chunk (tokens, see loss_chunk_len) the head and softmax run a chunk of the sequence
  at a time under jax.checkpoint: the float32 logits [B, T, V] never exist at once, neither in
  the forward pass nor saved for the backward one (each chunk's are recomputed there).
  """
  model = nnx.merge(graphdef, params)
  doc = mc.document_mask
  x, _ = model.hidden(batch["inputs"], positions=batch["positions"] if doc else None,
                      segment_ids=batch["segment_ids"] if doc else None)       # [B, T, D]
  head, targets = model.head(), batch["targets"]
  b, t, d = x.shape
  c = loss_chunk_len(t, loss_chunk)
  if c == t:
    nll, logz = _head_nll(x, head, targets)
  else:
    chunks = lambda a: jnp.swapaxes(a.reshape(b, t // c, c, *a.shape[2:]), 0, 1)  # [N, B, C..]
    one = jax.checkpoint(lambda xt: _head_nll(xt[0], head, xt[1]))
    nll, logz = jax.lax.map(one, (chunks(x), chunks(targets)))                 # [N, B, C]
    nll, logz = (jnp.swapaxes(a, 0, 1).reshape(b, t) for a in (nll, logz))
  return nll, logz, moe_lib.aux_losses(model)


def make_train_step(s: Setup) -> Callable[[dict, dict], tuple[dict, dict]]:
  """jit(state, batch) -> (state, metrics); gradient accumulation over micro-batches, global
  norm, and a non-finite guard that leaves params and optimizer state untouched."""
  t, mc, graphdef, tx = s.config.train, s.model_config, s.graphdef, s.tx
  accum = t.global_batch_size // t.micro_batch_size if t.micro_batch_size else 1

  def share_of_loss(params, batch, total_tokens):
    """This (micro-)batch's share of the global objective: its token nll sum (and z-loss) over
    the GLOBAL batch's token count, so the micro-batches' shares add up to the global mean
    whatever their own token counts; plus (its nll sum, its router losses)."""
    nll, logz, aux = token_nll(graphdef, params, batch, mc, t.loss_chunk)
    mask = batch["loss_mask"]
    loss = jnp.sum(nll * mask)
    if t.z_loss:
      loss += t.z_loss * jnp.sum(jnp.square(logz) * mask)
    loss = loss / total_tokens
    if aux:   # router losses are means per micro-batch: average them over micro-batches
      loss += (mc.moe_aux_loss_weight * aux["load_balance"]
               + mc.moe_z_loss_weight * aux["router_z"]) / accum
    return loss, (jnp.sum(nll * mask), aux)

  grad_fn = jax.value_and_grad(share_of_loss, has_aux=True)

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
      aux0 = {k: jnp.zeros(()) for k in moe_lib.aux_names(mc)}
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
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": opt_lib.applied_learning_rate(state["opt_state"], t),
               "tokens": total_tokens, "nonfinite": ~finite, **aux}
    coefficients = param_layouts.activation_coefficients(new_state["params"])
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
    nll, _, _ = token_nll(s.graphdef, params, batch, s.model_config,
                          s.config.train.loss_chunk)
    mask = batch["loss_mask"]
    return {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask),
            "bytes": jnp.sum(byte_lengths[batch["targets"]] * mask)}

  return jax.jit(sharding_lib.with_activation_sharding(step, s.mesh, s.rules),
                 in_shardings=(s.state_shardings["params"], s.batch_sharding))


def global_batch(s: Setup, local: dict) -> dict:
  """Assembles the global batch from this process's rows (each process reads only its part)."""
  return {k: jax.make_array_from_process_local_data(s.batch_sharding, np.asarray(local[k]))
          for k in BATCH_KEYS}
