"""Parameters <-> Hugging Face state dicts: Llama / Qwen3 (dense) and OLMoE (MoE) tensor names.

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
Dh/2). This model's `layers.rope` is already rotate-half, so q/k need no permutation: the plain
reshape/transpose above is the whole mapping (the logits test against LlamaForCausalLM checks it).

MoE models (OLMoE's layout, transformers' OlmoeForCausalLM; q_norm/k_norm then span the whole
projections: [H*Dh] and [K*Dh], config.model.qk_norm="projection"):

  model.layers.N.mlp.gate.weight                 [E, D]    mlp.router [D, E]
  model.layers.N.mlp.experts.M.gate_proj.weight  [F, D]    mlp.w_gate[M] [D, F] (gated only)
  model.layers.N.mlp.experts.M.up_proj.weight    [F, D]    mlp.w_up[M] [D, F]
  model.layers.N.mlp.experts.M.down_proj.weight  [D, F]    mlp.w_down[M] [F, D]
  model.layers.N.mlp.act_fn.weight / .bias       [r] / [1] mlp.act.* (PolyCom, shared; per
  model.layers.N.mlp.experts.M.act_fn.weight / .bias        expert: mlp.act_weight[M], ...)

save_pretrained (transformers 5.24) writes the per-expert names above, as the released OLMoE
checkpoints do; transformers' fused in-memory layout (experts.gate_up_proj [E, 2F, D], gate
first, and experts.down_proj [E, D, F]) is accepted on import too (unfuse_experts).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from polycom_jax import activations
from polycom_jax import model as model_lib
from polycom_jax import param_layouts
from polycom_jax.config_errors import ConfigError

Rule = tuple[str, tuple, Callable, Callable]   # (HF name, param path, param -> HF, HF -> param)
_SAME = (lambda x: x, lambda x: x)
_LINEAR = (lambda w: w.T, lambda t: t.T)      # [in, out] <-> PyTorch's [out, in]


def check_supported(mc: model_lib.ModelConfig):
  """Refuses models the Llama / Qwen3 / OLMoE layouts cannot hold, before anything is read or
  written."""
  if mc.num_experts:
    if mc.qk_norm != "projection" or mc.num_heads * mc.head_dim != mc.d_model:
      raise ConfigError(
          "an MoE model exports in OLMoE's layout (OlmoeForCausalLM), which has QK-norm over the "
          "whole projections and num_heads * head_dim == d_model: needs config.model.qk_norm="
          f"'projection' (got {mc.qk_norm!r}) and head_dim {mc.d_model // mc.num_heads} "
          f"(got {mc.head_dim})")
    return
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
  elif mc.qk_norm == "projection":              # [H, Dh] <-> [H*Dh] (OLMoE)
    rules += [("self_attn.q_norm.weight", ("attn", "q_norm", "scale"),
               lambda w: w.reshape(-1), lambda t: t.reshape(h, hd)),
              ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"),
               lambda w: w.reshape(-1), lambda t: t.reshape(k, hd))]
  rules.append(("post_attention_layernorm.weight", ("mlp_norm", "scale"), *_SAME))
  if mc.num_experts:
    return rules + _expert_rules(mc)
  if mc.gated:
    rules.append(("mlp.gate_proj.weight", ("mlp", "w_gate"), *_LINEAR))
  rules += [("mlp.up_proj.weight", ("mlp", "w_up"), *_LINEAR),
            ("mlp.down_proj.weight", ("mlp", "w_down"), *_LINEAR)]
  if activations.get(mc.activation).has_params:
    rules += [("mlp.act_fn.weight", ("mlp", "act", "weight"), *_SAME),
              ("mlp.act_fn.bias", ("mlp", "act", "bias"), *_SAME)]
  return rules


def _expert_rules(mc: model_lib.ModelConfig) -> list[Rule]:
  """OLMoE's MoE tensors as save_pretrained writes them: the router, then each expert's own
  projections (paths end in the expert index); PolyCom coefficients as extra tensors
  (mlp.act_fn.* for the layer's shared set, mlp.experts.N.act_fn.* per expert)."""
  rules = [("mlp.gate.weight", ("mlp", "router"), *_LINEAR)]          # [D, E] <-> [E, D]
  names = (("gate_proj", "w_gate"),) if mc.gated else ()
  names += (("up_proj", "w_up"), ("down_proj", "w_down"))
  for n in range(mc.num_experts):
    rules += [(f"mlp.experts.{n}.{hf}.weight", ("mlp", ours, n), *_LINEAR) for hf, ours in names]
  if activations.get(mc.activation).has_params:
    if mc.activation_per_expert:
      for n in range(mc.num_experts):
        rules += [(f"mlp.experts.{n}.act_fn.weight", ("mlp", "act_weight", n), *_SAME),
                  (f"mlp.experts.{n}.act_fn.bias", ("mlp", "act_bias", n), *_SAME)]
    else:
      rules += [("mlp.act_fn.weight", ("mlp", "act", "weight"), *_SAME),
                ("mlp.act_fn.bias", ("mlp", "act", "bias"), *_SAME)]
  return rules


def _stack_experts(params: dict) -> dict:
  """Per-expert entries {0: a, 1: b, ...} (from paths ending in an expert index) stacked into
  [E, ...] arrays, as the MoE layer holds them."""
  for layer in params["layers"].values():
    for name, value in layer["mlp"].items():
      if isinstance(value, dict) and value and all(isinstance(i, int) for i in value):
        layer["mlp"][name] = np.stack([value[i] for i in range(len(value))])
  return params


def unfuse_experts(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers 5's in-memory layout (experts.gate_up_proj [E, 2F, D] with the gate first,
  experts.down_proj [E, D, F]) as the per-expert tensors released OLMoE checkpoints and
  save_pretrained use; other tensors unchanged."""
  out = {}
  for name, t in tensors.items():
    prefix, _, leaf = name.rpartition(".experts.")
    if leaf == "gate_up_proj":
      f = t.shape[1] // 2
      for n in range(t.shape[0]):
        out[f"{prefix}.experts.{n}.gate_proj.weight"] = t[n, :f]
        out[f"{prefix}.experts.{n}.up_proj.weight"] = t[n, f:]
    elif leaf == "down_proj":
      for n in range(t.shape[0]):
        out[f"{prefix}.experts.{n}.down_proj.weight"] = t[n]
    else:
      out[name] = t
  return out


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
    params = param_layouts.unstack_layers(params)
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
  if mc.num_experts:
    tensors = unfuse_experts(tensors)
  check_tensors({n: t.shape for n, t in tensors.items()}, mc, where)
  dtype = model_lib.DTYPES[mc.param_dtype]
  params: dict = {}
  for name, path, _, inv in tensor_rules(mc):
    _set(params, path, np.asarray(inv(tensors[name]), dtype))
  if mc.num_experts:
    params = _stack_experts(params)
  return param_layouts.stack_layers(params) if mc.scan_layers else params
