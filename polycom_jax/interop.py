"""Hugging Face / PyTorch interop: config.json for a model, and Orbax checkpoints exported to /
imported from Hugging Face directories (tensor names: hf_layout.py; files: hf_files.py).

config.json is a LlamaConfig (a Qwen3Config with per-head qk_norm, an OlmoeConfig for MoE models)
plus `polycom_activation`, `mlp_gated`, `polycom_order`, `polycom_eps` and a `polycom_jax` block
with the run's config.model, from which an import rebuilds the model config. Dense models whose
MLP stock transformers lacks (PolyNorm, PolyReLU, their gated forms, ungated baselines) are
written as model_type "polycom" with the modeling code beside the weights (hf_remote/, `auto_map`):
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads them, and a load without
trust_remote_code stops with transformers' own message. The tokenizer goes with every export
(hf_tokenizer.py).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from polycom_jax import activations
from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import data as data_lib
from polycom_jax import evaluation
from polycom_jax import hf_layout
from polycom_jax import hf_remote
from polycom_jax import hf_tokenizer
from polycom_jax import model as model_lib
from polycom_jax import paths
from polycom_jax import setup as setup_lib
from polycom_jax.config_errors import ConfigError
from polycom_jax.hf_files import CONFIG_FILE, read_hf_dir, write_hf_dir, write_json
from polycom_jax.workdir_lock import WorkdirLock

# This codebase's activation -> Hugging Face `hidden_act` (ACT2FN names where one exists).
# The gated PolyCom forms take Motif's names (its MLP is down(poly_norm(gate x) * up x)).
HF_ACT = {"swiglu": "silu", "geglu": "gelu", "silu": "silu", "relu": "relu", "gelu": "gelu",
          "relu2": "relu2", "polynorm": "polynorm", "polyrelu": "polyrelu",
          "polynorm_glu": "poly_norm", "polyrelu_glu": "poly_relu"}
# Dense MLPs stock LlamaForCausalLM / Qwen3ForCausalLM run; the others need hf_remote's code.
STOCK_DENSE = ("swiglu", "geglu")
# config.json fields the tensor shapes cannot show, each with the config.model field it mirrors
# and the value Hugging Face assumes when a file leaves it out (None: not checked when absent).
CHECKED_FIELDS = (
    ("hidden_act", "activation", "silu"),
    ("mlp_gated", "activation", True),
    ("polycom_activation", "activation", None),
    ("polycom_order", "activation_order", None),
    ("polycom_eps", "activation", None),
    ("num_attention_heads", "num_heads", None),
    ("num_key_value_heads", "num_kv_heads", None),
    ("head_dim", "head_dim", None),
    ("rms_norm_eps", "norm_eps", 1e-6),
    ("rope_theta", "rope_theta", 10000.0),
    ("tie_word_embeddings", "tie_embeddings", False),
    ("num_experts", "num_experts", None),
    ("num_experts_per_tok", "num_experts_per_tok", None),
    ("norm_topk_prob", "moe_renormalize", None),
)

# ------------------------------------------------------------------------------------------------
# config.json

def _polycom_eps(mc: model_lib.ModelConfig) -> float:
  """The PolyNorm eps model.MLP uses (the module's default, built the same way)."""
  return activations.get(mc.activation).make(order=mc.activation_order).eps


def needs_remote_code(mc: model_lib.ModelConfig) -> bool:
  """A dense model whose MLP stock transformers cannot build (exported with hf_remote's code)."""
  return not mc.num_experts and mc.activation not in STOCK_DENSE


def hf_config(mc: model_lib.ModelConfig, model_section: Mapping | None = None,
              eos_id: int | None = None, pad_id: int | None = None) -> dict:
  """config.json for the model: LlamaConfig fields (Qwen3Config with qk_norm, PolycomConfig for
  the MLPs stock transformers lacks) plus PolyCom's."""
  act = activations.get(mc.activation)
  arch, model_type = (("OlmoeForCausalLM", "olmoe") if mc.num_experts else
                      (hf_remote.ARCHITECTURE, hf_remote.MODEL_TYPE) if needs_remote_code(mc) else
                      ("Qwen3ForCausalLM", "qwen3") if mc.qk_norm == "head" else
                      ("LlamaForCausalLM", "llama"))
  cfg = {
      "architectures": [arch], "model_type": model_type,
      "vocab_size": mc.vocab_size, "hidden_size": mc.d_model, "intermediate_size": mc.d_ff,
      "num_hidden_layers": mc.num_layers, "num_attention_heads": mc.num_heads,
      "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
      "hidden_act": HF_ACT[mc.activation], "mlp_gated": act.gated,
      "polycom_activation": mc.activation,
      "max_position_embeddings": mc.max_seq_len, "rms_norm_eps": mc.norm_eps,
      "rope_theta": mc.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},
      "tie_word_embeddings": mc.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "initializer_range": mc.init_std, "torch_dtype": mc.param_dtype,
      "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id,
  }
  if mc.num_experts:         # OlmoeConfig: intermediate_size is the expert width
    cfg.update(intermediate_size=mc.moe_d_ff, num_experts=mc.num_experts,
               num_experts_per_tok=mc.num_experts_per_tok, norm_topk_prob=mc.moe_renormalize,
               router_aux_loss_coef=mc.moe_aux_loss_weight, clip_qkv=None)
    del cfg["head_dim"], cfg["mlp_bias"]      # OLMoE derives head_dim from the hidden size
  if needs_remote_code(mc):
    cfg.update(auto_map=dict(hf_remote.AUTO_MAP), qk_norm=mc.qk_norm == "head")
  if act.has_params:
    cfg["polycom_order"] = mc.activation_order
  if act.module is activations.PolyNorm:
    cfg["polycom_eps"] = _polycom_eps(mc)
  if model_section is not None:
    cfg["polycom_jax"] = {"model": dict(model_section)}
  return cfg


def _rope_theta(hf: Mapping) -> float:
  """rope_theta of a config.json (transformers 4 or 5 style); only plain RoPE is supported."""
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  if rope.get("rope_type", "default") != "default" or scaling:
    raise ConfigError(f"config.json: RoPE scaling ({rope or scaling}) is not supported; "
                      "this model uses plain RoPE")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _hf_value(hf: Mapping, key: str, default: Any) -> Any:
  """A checked config.json field, with the values Hugging Face derives when it is absent."""
  if key == "rope_theta":
    return _rope_theta(hf)
  if key == "num_key_value_heads":
    return hf.get(key) or hf.get("num_attention_heads")
  if key == "head_dim":
    return hf.get(key) or hf["hidden_size"] // hf["num_attention_heads"]
  return hf.get(key, default)


def check_hf_config(hf: Mapping, mc: model_lib.ModelConfig, where: str):
  """Raises ConfigError at the first config.json field (activation, heads, norm eps, rope) that
  disagrees with the model config: shapes alone cannot tell H heads of Dh from 2H of Dh/2."""
  expected = hf_config(mc)
  for key, field, default in CHECKED_FIELDS:
    if key not in expected:                   # not part of this layout (OLMoE: head_dim)
      continue
    found = _hf_value(hf, key, default)
    if found is None:                         # absent, and Hugging Face assumes nothing
      continue
    if found != expected.get(key):
      raise ConfigError(f"{where}: {key} is {found!r}, but config.model.{field}="
                        f"{getattr(mc, field)!r} gives {expected.get(key)!r}")


def _activation_from_hf(hf: Mapping) -> str:
  """This codebase's activation name for a config.json without `polycom_activation`."""
  gated = hf.get("mlp_gated", True)
  act = hf.get("hidden_act", "silu")
  for name, hf_name in HF_ACT.items():
    if hf_name == act and activations.get(name).gated == gated:
      return name
  raise ConfigError(f"config.json: hidden_act={act!r} (gated={gated}) has no equivalent here; "
                    f"supported: {sorted(set(HF_ACT.values()))}")


def model_fields_from_hf(hf: Mapping) -> dict:
  """config.model fields for a Hugging Face config.json: the exporting run's own when it has a
  `polycom_jax` block, else read from the Llama fields (other fields keep their defaults)."""
  if "polycom_jax" in hf:
    return dict(hf["polycom_jax"]["model"])
  heads = hf["num_attention_heads"]
  moe = {}
  if hf.get("model_type") == "olmoe":
    moe = {"num_experts": hf["num_experts"], "num_experts_per_tok": hf["num_experts_per_tok"],
           "moe_d_ff": hf["intermediate_size"], "moe_renormalize": hf.get("norm_topk_prob", False),
           "qk_norm": "projection"}
  return {
      "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
      "num_layers": hf["num_hidden_layers"], "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "d_ff": hf["intermediate_size"], "activation": hf.get("polycom_activation") or
      _activation_from_hf(hf), "activation_order": hf.get("polycom_order", 3),
      "max_seq_len": hf.get("max_position_embeddings", 2048),
      "rope_theta": _rope_theta(hf), "norm_eps": hf.get("rms_norm_eps", 1e-6),
      "qk_norm": "head" if hf.get("model_type") == "qwen3" or hf.get("qk_norm") is True else
                 "none",
      "tie_embeddings": hf.get("tie_word_embeddings", False),
      **moe,
  }


# ------------------------------------------------------------------------------------------------
# Checkpoints

def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host (gathered from the other processes when it spans hosts)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export_checkpoint(config, workdir: str, out_dir: str, step: int | None = None) -> int:
  """Writes the workdir's checkpoint at step (default: the latest) to out_dir as a Hugging Face
  directory (model.safetensors + config.json); returns the step exported."""
  hf_layout.check_supported(model_lib.ModelConfig.from_config(config.model))
  tokenizer_files = hf_tokenizer.tokenizer_files(config.data, data_lib.get_tokenizer(config.data))
  s, params, step = evaluation.restore_params(config, workdir, step)
  host = jax.tree.map(_to_host, nnx.to_pure_dict(params))
  tensors = hf_layout.to_hf_state_dict(host, s.model_config)
  hf = hf_config(s.model_config, config.model.to_dict(), s.tokenizer.eos_id, s.tokenizer.pad_id)
  hf["polycom_jax"]["step"] = step
  if jax.process_index() == 0:
    write_model_dir(out_dir, tensors, hf, s.model_config)
    hf_tokenizer.write(tokenizer_files, out_dir)
    write_json(out_dir, "generation_config.json", _generation_config(s))
  return step


def write_model_dir(out_dir: str, tensors: Mapping[str, np.ndarray], hf: Mapping,
                    mc: model_lib.ModelConfig):
  """The weights and config.json, with hf_remote's modeling code when the MLP needs it."""
  write_hf_dir(out_dir, tensors, hf)
  if needs_remote_code(mc):
    for name in hf_remote.FILES:
      shutil.copyfile(os.path.join(hf_remote.DIRECTORY, name), os.path.join(out_dir, name))


def _generation_config(s: setup_lib.Setup) -> dict:
  """generate()'s defaults: EOS as the start and stop token, as training and
  evaluation.generate use it, and the rows past the tokenizer's vocabulary (the embedding's
  padding to config.model.vocab_size) never sampled, as evaluation.generate never picks them."""
  tok = s.tokenizer
  return {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
          "suppress_tokens": list(range(tok.vocab_size, s.model_config.vocab_size))}


def _sharded_params(s: setup_lib.Setup, values: Mapping) -> Any:
  """The params State with each numpy value placed as a global array on the run's mesh."""
  params = jax.tree.map(lambda a: a, s.abstract_state["params"])    # a copy to fill in
  targets = nnx.to_pure_dict(params)
  arrays = jax.tree.map(
      lambda v, a: jax.make_array_from_callback(a.shape, a.sharding, lambda index: v[index]),
      values, targets)
  nnx.replace_by_pure_dict(params, arrays)
  return params


def _fresh_data_state(s: setup_lib.Setup) -> dict:
  """The train iterator's state before its first batch: train.py starts the data from it."""
  it = data_lib.make_train_iterator(
      s.config.data, s.tokenizer, batch_size=s.per_process_batch, seed=s.config.data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  state = it.get_state()
  it.close()
  return state


def _require_no_checkpoints(workdir: str):
  """An import starts a run: refuse a workdir whose own checkpoints train.py would resume from."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  steps = sorted(int(n) for n in paths.listdir(directory) if n.isdigit())
  if steps:
    raise ConfigError(f"--workdir={workdir} already has checkpoints {steps}; import into an "
                      "empty workdir")


def import_checkpoint(config, hf_dir: str, workdir: str, step: int = 0) -> str:
  """Writes hf_dir's weights as the checkpoint at `step` of an empty workdir, with a fresh
  optimizer state and data position, so train.py continues from it and eval.py evaluates it.

  config.model must describe the directory's model (model_fields_from_hf reads it from
  config.json); a ConfigError names the first tensor, then config.json field, that differs.
  Returns the checkpoint's path.
  """
  s = setup_lib.setup(config)
  hf_layout.check_supported(s.model_config)
  _require_no_checkpoints(workdir)
  hf, tensors = read_hf_dir(hf_dir)
  values = hf_layout.from_hf_state_dict(tensors, s.model_config, where=f"--hf_dir={hf_dir}")
  check_hf_config(hf, s.model_config, where=os.path.join(hf_dir, CONFIG_FILE))
  setup_lib.check_workdir(workdir)
  with WorkdirLock(workdir):
    return _write_imported(s, config, values, workdir, step)


def _write_imported(s: setup_lib.Setup, config, values, workdir: str, step: int) -> str:
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    with jax.set_mesh(s.mesh):
      params = _sharded_params(s, values)
      opt_state = jax.jit(s.tx.init, out_shardings=s.state_shardings["opt_state"])(params)
    state = {"step": jax.device_put(jnp.asarray(step, jnp.int32), s.state_shardings["step"]),
             "params": params, "opt_state": opt_state}
    checkpointer.save(step, state, _fresh_data_state(s), setup_lib.config_as_dict(config),
                      force=True)
  finally:
    checkpointer.close()
  return paths.join(checkpointer.directory, str(step))
