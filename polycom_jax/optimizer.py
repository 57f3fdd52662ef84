"""AdamW with linear warmup + cosine decay and global-norm clipping (the paper's recipe)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train) -> optax.Schedule:
  """0 -> learning_rate over warmup_steps, then cosine down to min_learning_rate at num_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=max(train.num_steps, train.warmup_steps + 1),
      end_value=train.min_learning_rate)


def decay_mask(params):
  """Weight decay on matrices (projections, embeddings) only: not on norm scales, biases, or the
  PolyCom coefficients (as in both reference codebases)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                           eps=train.adam_eps, weight_decay=train.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)

