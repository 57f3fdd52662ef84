"""Checkpoint interop with PyTorch / Hugging Face: Orbax checkpoints <-> Llama-layout safetensors.

A Hugging Face directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Tensor names and shapes (PyTorch Linear weights are [out, in]):

  model.embed_tokens.weight                  [V, D]      embed [V, D]
  model.layers.N.input_layernorm.weight      [D]         layers.N.attn_norm.scale
  model.layers.N.self_attn.q_proj.weight     [H*Dh, D]   attn.wq [D, H, Dh]: reshape(D, H*Dh).T
  model.layers.N.self_attn.k_proj.weight     [K*Dh, D]   attn.wk [D, K, Dh] (v_proj: attn.wv)
  model.layers.N.self_attn.o_proj.weight     [D, H*Dh]   attn.wo [H, Dh, D]: reshape(H*Dh, D).T
  model.layers.N.self_attn.q_norm.weight     [Dh]        attn.q_norm.scale (qk_norm; also k_norm)
  model.layers.N.post_attention_layernorm.weight [D]     layers.N.mlp_norm.scale
  model.layers.N.mlp.gate_proj.weight        [F, D]      mlp.w_gate [D, F] (gated only)
  model.layers.N.mlp.up_proj.weight          [F, D]      mlp.w_up [D, F]
  model.layers.N.mlp.down_proj.weight        [D, F]      mlp.w_down [F, D]
  model.layers.N.mlp.act_fn.weight / .bias   [r] / [1]   mlp.act.weight / .bias (PolyNorm,
                                                         PolyReLU; weight[0]: highest power)
  model.norm.weight                          [D]         final_norm.scale
  lm_head.weight                             [V, D]      lm_head [D, V] (absent when tied)

Rotary layout: Hugging Face's convert_llama_weights_to_hf permutes the rows of Meta's q/k
weights from the interleaved rotary layout (pairs 2i, 2i+1) to the rotate-half layout (i, i +
Dh/2). This model's `model.rope` is already rotate-half, so q/k need no permutation: the plain
reshape/transpose above is the whole mapping (the logits test against LlamaForCausalLM checks it).

config.json is a LlamaConfig (a Qwen3Config with qk_norm, whose per-head q/k norm is this
model's) plus `polycom_activation`, `mlp_gated`, `polycom_order`, `polycom_eps` and a
`polycom_jax` block with the run's config.model, from which an import rebuilds the model config.
Ungated MLPs have no gate_proj, and `hidden_act` is then the activation's own name: stock
transformers loads only the gated silu/gelu models; the others need their MLP swapped in.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from polycom_jax import activations
from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import data as data_lib
from polycom_jax import evaluation
from polycom_jax import model as model_lib
from polycom_jax import setup as setup_lib
from polycom_jax.config_errors import ConfigError
from polycom_jax.hf_files import CONFIG_FILE, read_hf_dir, write_hf_dir

# This codebase's activation -> Hugging Face `hidden_act` (ACT2FN names where one exists).
HF_ACT = {"swiglu": "silu", "geglu": "gelu", "silu": "silu", "relu": "relu", "gelu": "gelu",
          "relu2": "relu2", "polynorm": "polynorm", "polyrelu": "polyrelu"}
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
)

Rule = tuple[str, tuple, Callable, Callable]   # (HF name, param path, param -> HF, HF -> param)
_SAME = (lambda x: x, lambda x: x)
_LINEAR = (lambda w: w.T, lambda t: t.T)      # [in, out] <-> PyTorch's [out, in]


# ------------------------------------------------------------------------------------------------
# Parameters <-> Hugging Face state dict (pure functions over nested dicts of arrays)

def check_supported(mc: model_lib.ModelConfig):
  """Refuses models the Llama layout cannot hold, before anything is read or written."""
  if mc.num_experts:
    raise ConfigError(f"config.model.num_experts={mc.num_experts}: Hugging Face export/import "
                      "supports dense models only")
  if mc.qk_norm == "projection":
    raise ConfigError("config.model.qk_norm='projection' (OLMoE's) has no Llama/Qwen3 layout; "
                      "the dense export holds qk_norm 'none' or 'head' (Qwen3)")


def _layer_rules(mc: model_lib.ModelConfig) -> list[Rule]:
  """One block's tensors, in Hugging Face order, paths relative to the block."""
  d, h, k, hd = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim

  def heads_in(n: int):                        # [D, n, Dh] <-> [n*Dh, D]
    return lambda w: w.reshape(d, n * hd).T, lambda t: t.T.reshape(d, n, hd)

  rules = [("input_layernorm.weight", ("attn_norm", "scale"), *_SAME),
           ("self_attn.q_proj.weight", ("attn", "wq"), *heads_in(h)),
           ("self_attn.k_proj.weight", ("attn", "wk"), *heads_in(k)),
           ("self_attn.v_proj.weight", ("attn", "wv"), *heads_in(k)),
           ("self_attn.o_proj.weight", ("attn", "wo"),              # [H, Dh, D] <-> [D, H*Dh]
            lambda w: w.reshape(h * hd, d).T, lambda t: t.T.reshape(h, hd, d))]
  if mc.qk_norm == "head":
    rules += [("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), *_SAME),
              ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), *_SAME)]
  rules.append(("post_attention_layernorm.weight", ("mlp_norm", "scale"), *_SAME))
  if mc.gated:
    rules.append(("mlp.gate_proj.weight", ("mlp", "w_gate"), *_LINEAR))
  rules += [("mlp.up_proj.weight", ("mlp", "w_up"), *_LINEAR),
            ("mlp.down_proj.weight", ("mlp", "w_down"), *_LINEAR)]
  if activations.get(mc.activation).has_params:
    rules += [("mlp.act_fn.weight", ("mlp", "act", "weight"), *_SAME),
              ("mlp.act_fn.bias", ("mlp", "act", "bias"), *_SAME)]
  return rules


def tensor_rules(mc: model_lib.ModelConfig) -> list[Rule]:
  """Every tensor of the model, in Hugging Face order, with its parameter path and mappings."""
  check_supported(mc)
  rules = [("model.embed_tokens.weight", ("embed",), *_SAME)]
  for i in range(mc.num_layers):
    rules += [(f"model.layers.{i}.{name}", ("layers", i, *path), fwd, inv)
              for name, path, fwd, inv in _layer_rules(mc)]
  rules.append(("model.norm.weight", ("final_norm", "scale"), *_SAME))
  if not mc.tie_embeddings:
    rules.append(("lm_head.weight", ("lm_head",), *_LINEAR))
  return rules


def _get(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value: Any):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_hf_state_dict(params: Mapping, mc: model_lib.ModelConfig) -> dict[str, Any]:
  """Hugging Face name -> array, from params as a nested dict (nnx.to_pure_dict's layout)."""
  if mc.scan_layers:
    params = model_lib.unstack_layers(params)
  return {name: fwd(_get(params, path)) for name, path, fwd, _ in tensor_rules(mc)}


def expected_shapes(mc: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face name -> shape for this model config, in Hugging Face order (nothing built)."""
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(mc, nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  out = jax.eval_shape(lambda p: to_hf_state_dict(p, mc), params)
  return {name: tuple(a.shape) for name, a in out.items()}


def check_tensors(shapes: Mapping[str, tuple[int, ...]], mc: model_lib.ModelConfig, where: str):
  """Raises ConfigError at the first tensor (in Hugging Face order) that is missing or has the
  wrong shape, then at the first unexpected one."""
  expected = expected_shapes(mc)
  unexpected = [n for n in shapes if n not in expected]
  for name, shape in expected.items():
    if name not in shapes:
      hint = f"; unexpected tensors found: {unexpected[:5]}" if unexpected else ""
      raise ConfigError(f"{where}: tensor {name} is missing (expected shape {list(shape)} for "
                        f"this config.model){hint}")
    if tuple(shapes[name]) != shape:
      raise ConfigError(f"{where}: tensor {name} has shape {list(shapes[name])}, but this "
                        f"config.model expects {list(shape)}")
  if unexpected:
    raise ConfigError(f"{where}: unexpected tensor {unexpected[0]} (not part of this "
                      f"config.model; {len(unexpected)} unexpected in all)")


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], mc: model_lib.ModelConfig,
                       where: str = "state dict") -> dict:
  """Params as a nested dict of numpy arrays (in config.model.param_dtype) from a Hugging Face
  state dict; the names and shapes are checked first (ConfigError names the first mismatch)."""
  check_tensors({n: t.shape for n, t in tensors.items()}, mc, where)
  dtype = model_lib.DTYPES[mc.param_dtype]
  params: dict = {}
  for name, path, _, inv in tensor_rules(mc):
    _set(params, path, np.asarray(inv(tensors[name]), dtype))
  return model_lib.stack_layers(params) if mc.scan_layers else params


# ------------------------------------------------------------------------------------------------
# config.json

def _polycom_eps(mc: model_lib.ModelConfig) -> float:
  """The PolyNorm eps model.MLP uses (the module's default, built the same way)."""
  return activations.get(mc.activation).make(order=mc.activation_order).eps


def hf_config(mc: model_lib.ModelConfig, model_section: Mapping | None = None,
              eos_id: int | None = None, pad_id: int | None = None) -> dict:
  """config.json for the model: LlamaConfig fields (Qwen3Config with qk_norm) plus PolyCom's."""
  act = activations.get(mc.activation)
  arch, model_type = (("Qwen3ForCausalLM", "qwen3") if mc.qk_norm == "head" else
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
  if act.has_params:
    cfg["polycom_order"] = mc.activation_order
  if mc.activation == "polynorm":
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
  return {
      "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
      "num_layers": hf["num_hidden_layers"], "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "d_ff": hf["intermediate_size"], "activation": hf.get("polycom_activation") or
      _activation_from_hf(hf), "activation_order": hf.get("polycom_order", 3),
      "max_seq_len": hf.get("max_position_embeddings", 2048),
      "rope_theta": _rope_theta(hf), "norm_eps": hf.get("rms_norm_eps", 1e-6),
      "qk_norm": "head" if hf.get("model_type") == "qwen3" else "none",
      "tie_embeddings": hf.get("tie_word_embeddings", False),
  }


# ------------------------------------------------------------------------------------------------
# Files

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
  check_supported(model_lib.ModelConfig.from_config(config.model))
  s, params, step = evaluation.restore_params(config, workdir, step)
  host = jax.tree.map(_to_host, nnx.to_pure_dict(params))
  tensors = to_hf_state_dict(host, s.model_config)
  hf = hf_config(s.model_config, config.model.to_dict(), s.tokenizer.eos_id, s.tokenizer.pad_id)
  hf["polycom_jax"]["step"] = step
  if jax.process_index() == 0:
    write_hf_dir(out_dir, tensors, hf)
  return step


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
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []
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
  check_supported(s.model_config)
  _require_no_checkpoints(workdir)
  hf, tensors = read_hf_dir(hf_dir)
  values = from_hf_state_dict(tensors, s.model_config, where=f"--hf_dir={hf_dir}")
  check_hf_config(hf, s.model_config, where=os.path.join(hf_dir, CONFIG_FILE))
  setup_lib.check_workdir(workdir)
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
  return os.path.join(checkpointer.directory, str(step))
