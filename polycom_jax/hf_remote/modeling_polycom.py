"""PolycomForCausalLM: Llama (or Qwen3, with per-head qk-norm) attention and a PolyCom MLP.

Written by polycom-jax next to the weights of an export; loaded by transformers with
trust_remote_code=True. The math is polycom-jax's (shared/DESIGN.md), per row over the last axis,
with N(v) = v / sqrt(mean(v**2) + eps) and weight[0] the highest power:
  PolyNorm(x) = sum_{i=1..r} weight[r-i] * N(x**i) + bias
  PolyReLU(x) = sum_{i=1..r} weight[r-i] * relu(x)**i + bias
computed in float32 and cast back. Tensors: mlp.{gate_proj,up_proj,down_proj}.weight and
mlp.act_fn.{weight [r], bias [1]} (Motif's names for the gated PolyNorm MLP).
"""

import math

import torch
from torch import nn
from transformers.models.llama import modeling_llama as llama
from transformers.models.qwen3 import modeling_qwen3 as qwen3

from .configuration_polycom import PolycomConfig

# eps / s**(2p) is clamped to exp(80) (as polycom-jax does), so rows of tiny values stay finite.
_MAX_LOG_EPS = 80.0


class PolyNorm(nn.Module):
  def __init__(self, order: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
    self.bias = nn.Parameter(torch.zeros(1))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # Each row divided by its largest |x| first: x**(2r) stays finite, and the scale cancels.
    x32 = x.float()
    s = x32.abs().amax(dim=-1, keepdim=True)
    s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    z, log_s = x32 / s, torch.log(s)
    w, order = self.weight.float(), self.weight.shape[0]
    y, zp = torch.zeros_like(z) + self.bias.float(), torch.ones_like(z)
    for p in range(1, order + 1):
      zp = zp * z
      eps_p = torch.exp(torch.clamp(math.log(self.eps) - 2 * p * log_s, max=_MAX_LOG_EPS))
      y = y + w[order - p] * zp * torch.rsqrt(zp.square().mean(dim=-1, keepdim=True) + eps_p)
    return y.to(x.dtype)


class PolyReLU(nn.Module):
  def __init__(self, order: int):
    super().__init__()
    self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
    self.bias = nn.Parameter(torch.zeros(1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    z, w = torch.relu(x.float()), self.weight.float()
    y = torch.zeros_like(z)
    for i in range(w.shape[0]):                 # Horner: ((w0 z + w1) z + w2) z
      y = (y + w[i]) * z
    return (y + self.bias.float()).to(x.dtype)


class _Relu2(nn.Module):
  def forward(self, x):
    return torch.square(torch.relu(x))


def _activation(config: PolycomConfig) -> nn.Module:
  name = config.polycom_activation
  if name.startswith("polynorm"):
    return PolyNorm(config.polycom_order, config.polycom_eps)
  if name.startswith("polyrelu"):
    return PolyReLU(config.polycom_order)
  plain = {"swiglu": nn.SiLU, "silu": nn.SiLU, "geglu": nn.GELU, "gelu": nn.GELU,
           "relu": nn.ReLU, "relu2": _Relu2}
  if name not in plain:
    raise ValueError(f"polycom_activation={name!r} is not one of "
                     f"{['polynorm', 'polyrelu', 'polynorm_glu', 'polyrelu_glu', *plain]}")
  return plain[name]()


class PolycomMLP(nn.Module):
  """down(act(gate(x)) * up(x)) when mlp_gated, else down(act(up(x)))."""

  def __init__(self, config: PolycomConfig):
    super().__init__()
    d, f = config.hidden_size, config.intermediate_size
    self.gated = config.mlp_gated
    if self.gated:
      self.gate_proj = nn.Linear(d, f, bias=False)
    self.up_proj = nn.Linear(d, f, bias=False)
    self.down_proj = nn.Linear(f, d, bias=False)
    self.act_fn = _activation(config)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.gated:
      return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return self.down_proj(self.act_fn(self.up_proj(x)))


class PolycomDecoderLayer(llama.LlamaDecoderLayer):
  """Llama's pre-norm block (its forward) with the PolyCom MLP and, with qk_norm, Qwen3's
  attention."""

  def __init__(self, config: PolycomConfig, layer_idx: int):
    nn.Module.__init__(self)
    self.hidden_size = config.hidden_size
    attention = qwen3.Qwen3Attention if config.qk_norm else llama.LlamaAttention
    self.self_attn = attention(config=config, layer_idx=layer_idx)
    self.mlp = PolycomMLP(config)
    self.input_layernorm = llama.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    self.post_attention_layernorm = llama.LlamaRMSNorm(config.hidden_size,
                                                       eps=config.rms_norm_eps)


class PolycomPreTrainedModel(llama.LlamaPreTrainedModel):
  config: PolycomConfig
  config_class = PolycomConfig
  _no_split_modules = ["PolycomDecoderLayer"]
  _can_record_outputs = {"hidden_states": PolycomDecoderLayer,
                         "attentions": (llama.LlamaAttention, qwen3.Qwen3Attention)}

  @torch.no_grad()
  def _init_weights(self, module):
    super()._init_weights(module)
    if isinstance(module, (PolyNorm, PolyReLU)):
      module.weight.fill_(1.0 / module.weight.shape[0])
      module.bias.zero_()


class PolycomModel(PolycomPreTrainedModel, llama.LlamaModel):
  """LlamaModel's forward over PolycomDecoderLayers."""

  def __init__(self, config: PolycomConfig):
    PolycomPreTrainedModel.__init__(self, config)
    self.padding_idx = config.pad_token_id
    self.vocab_size = config.vocab_size
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
    self.layers = nn.ModuleList(
        [PolycomDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
    self.norm = llama.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    self.rotary_emb = llama.LlamaRotaryEmbedding(config=config)
    self.gradient_checkpointing = False
    self.post_init()


class PolycomForCausalLM(PolycomPreTrainedModel, llama.LlamaForCausalLM):
  """LlamaForCausalLM (its forward, generate) over a PolycomModel."""

  def __init__(self, config: PolycomConfig):
    PolycomPreTrainedModel.__init__(self, config)
    self.model = PolycomModel(config)
    self.vocab_size = config.vocab_size
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()


__all__ = ["PolycomForCausalLM", "PolycomModel", "PolycomPreTrainedModel"]
