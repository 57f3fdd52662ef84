"""AdamW with linear warmup + cosine decay and global-norm clipping (the paper's recipe)."""

from __future__ import annotations

import functools

import jax
import optax
from flax import nnx

# Which kinds of parameter (layers.PARAM_KINDS, set where each is created) get weight decay.
# Neither reference decays the PolyCom coefficients ("activation").
DECAY_RULES = {
    # Megatron (the dense reference): no decay on 1-D parameters and biases: norm scales and
    # the activation's coefficients; matrices and embeddings are decayed.
    "megatron": ("matrix", "embedding"),
    # OLMo (the MoE reference, decay_norm_and_bias and decay_embeddings on): everything but the
    # `Activation` modules.
    "olmoe": ("matrix", "embedding", "norm"),
}


def learning_rate_schedule(train) -> optax.Schedule:
  """0 -> learning_rate over warmup_steps, then cosine down to min_learning_rate at num_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=max(train.num_steps, train.warmup_steps + 1),
      end_value=train.min_learning_rate)


def decay_mask(params, rule: str = "megatron"):
  """Per parameter: whether weight decay applies, by its kind (metadata `param_kind`) and the
  rule, the same for a [D] norm scale, its scanned [layers, D] stack and per-expert arrays.
  A parameter without a kind (a module of another codebase) is decayed when it is a matrix."""
  decayed = DECAY_RULES[rule]

  def decide(v: nnx.Variable):
    kind = v.get_metadata().get("param_kind")
    return v.replace(kind in decayed if kind is not None else v.get_value().ndim >= 2)
  return jax.tree.map(decide, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def applied_learning_rate(opt_state, train) -> jax.Array:
  """The learning rate the next update applies: the schedule at optax's own count, which does
  not advance on skipped (non-finite) steps and starts at 0 after an import at a later step."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  return learning_rate_schedule(train)(counts[0])


def make_optimizer(train) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                           eps=train.adam_eps, weight_decay=train.weight_decay,
                           mask=functools.partial(decay_mask, rule=train.weight_decay_rule)))
  return optax.chain(*chain)
