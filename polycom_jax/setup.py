"""Everything a run derives from its config before anything compiles: validation, the mesh, the
tokenizer, the optimizer and the abstract (sharded) train state.

The state is a plain pytree {"step", "params", "opt_state"} (params: the model's nnx.State of
Params), so jit shardings, Orbax checkpoints and optax all see the same tree. The model is
rebuilt from the static graphdef inside each step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from polycom_jax import data as data_lib
from polycom_jax import model as model_lib
from polycom_jax import optimizer as opt_lib
from polycom_jax import paths
from polycom_jax import sharding as sharding_lib
from polycom_jax.config_errors import ConfigError, require

NONFINITE_POLICIES = ("skip", "halt")


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


def validate_config(config: ml_collections.ConfigDict,
                    platform: str | None = None) -> model_lib.ModelConfig:
  """Checks every training field and the model config; returns the ModelConfig resolved for
  `platform` (default: JAX's default backend)."""
  mc = model_lib.ModelConfig.from_config(config.model, platform)
  t = config.train
  for name in ("num_steps", "global_batch_size", "log_every"):
    require(t[name] > 0, f"config.train.{name}", f"must be > 0, got {t[name]}")
  for name in ("checkpoint_every", "eval_every", "eval_batches", "warmup_steps",
               "micro_batch_size", "weight_decay", "grad_clip", "z_loss", "loss_chunk"):
    require(t[name] >= 0, f"config.train.{name}", f"must be >= 0, got {t[name]}")
  require(t.learning_rate > 0, "config.train.learning_rate", f"must be > 0, got {t.learning_rate}")
  require(0 <= t.min_learning_rate <= t.learning_rate, "config.train.min_learning_rate",
          f"must be in [0, learning_rate={t.learning_rate}], got {t.min_learning_rate}")
  for name in ("b1", "b2"):
    require(0 <= t[name] < 1, f"config.train.{name}", f"must be in [0, 1), got {t[name]}")
  require(t.adam_eps > 0, "config.train.adam_eps", f"must be > 0, got {t.adam_eps}")
  require(t.keep_checkpoints >= 1, "config.train.keep_checkpoints",
          f"must be >= 1, got {t.keep_checkpoints}")
  if t.micro_batch_size:
    require(t.global_batch_size % t.micro_batch_size == 0, "config.train.micro_batch_size",
            f"({t.micro_batch_size}) must divide config.train.global_batch_size "
            f"({t.global_batch_size})")
  require(t.weight_decay_rule in opt_lib.DECAY_RULES, "config.train.weight_decay_rule",
          f"must be one of {tuple(opt_lib.DECAY_RULES)}, got {t.weight_decay_rule!r}")
  require(t.nonfinite_policy in NONFINITE_POLICIES, "config.train.nonfinite_policy",
          f"must be one of {NONFINITE_POLICIES}, got {t.nonfinite_policy!r}")
  require(config.data.seq_len > 1, "config.data.seq_len", f"must be > 1, got {config.data.seq_len}")
  require(config.data.seq_len <= mc.max_seq_len, "config.data.seq_len",
          f"({config.data.seq_len}) is longer than config.model.max_seq_len ({mc.max_seq_len})")
  require(not mc.mlp_chunk or config.data.seq_len % mc.mlp_chunk == 0, "config.model.mlp_chunk",
          f"({mc.mlp_chunk}) must divide config.data.seq_len ({config.data.seq_len})")
  if mc.attention_impl == "splash" and config.data.seq_len % 128:
    require(config.model.get("attention_impl", "auto") == "auto", "config.model.attention_impl",
            f"'splash' needs config.data.seq_len to be a multiple of 128, got "
            f"{config.data.seq_len}; use 'xla'")
    print(f"note: attention auto -> xla, not splash: seq_len {config.data.seq_len} is not a "
          "multiple of 128", file=sys.stderr)
    mc = dataclasses.replace(mc, attention_impl="xla")
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
  mc = validate_config(config, devices[0].platform if devices else None)
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
  abstract = jax.eval_shape(init_fn(mc, tx, config.seed))
  shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Setup(config, mc, mesh, rules, tokenizer, graphdef, tx, shardings, abstract)


def init_fn(mc: model_lib.ModelConfig, tx, seed: int) -> Callable[[], dict]:
  """() -> a fresh state: the function to jit (sharded) or eval_shape (abstract)."""
  def init():
    params = nnx.state(model_lib.Transformer(mc, nnx.Rngs(seed)), nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  return init


def init_state(s: Setup) -> dict:
  """Fresh state, created directly in its sharded layout (never whole on one device)."""
  with jax.set_mesh(s.mesh):
    return jax.jit(init_fn(s.model_config, s.tx, s.config.seed),
                   out_shardings=s.state_shardings)()


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def check_workdir(workdir: str):
  """The workdir exists (created if needed) and is writable, or a ConfigError says why."""
  workdir = paths.resolve(workdir, "--workdir")
  try:
    paths.makedirs(workdir)
    probe = paths.join(workdir, f".write_probe_{jax.process_index()}")
    paths.write_text(probe, "ok")
    paths.remove(probe)
  except Exception as e:  # OSError locally; gcsfs and google-auth raise their own types
    raise ConfigError(f"--workdir={workdir} is not writable: {type(e).__name__}: {e}") from None
