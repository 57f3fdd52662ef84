"""PolycomConfig: a LlamaConfig whose MLP activation may be PolyNorm or PolyReLU (gated or not).

Written by polycom-jax next to the weights of an export; loaded by transformers with
trust_remote_code=True. Fields beyond Llama's:
  polycom_activation  the polycom-jax activation: polynorm, polyrelu, polynorm_glu, polyrelu_glu,
                      swiglu, geglu, relu, gelu, relu2, silu
  mlp_gated           the MLP is down(act(gate(x)) * up(x)); else down(act(up(x))), no gate_proj
  polycom_order       r, the number of powers (PolyNorm / PolyReLU)
  polycom_eps         PolyNorm's eps
  qk_norm             per-head RMSNorm of queries and keys (the Qwen3 layout)
"""

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig


@strict
class PolycomConfig(LlamaConfig):
  model_type = "polycom"

  polycom_activation: str = "polynorm"
  mlp_gated: bool = False
  polycom_order: int = 3
  polycom_eps: float = 1e-6
  qk_norm: bool = False


__all__ = ["PolycomConfig"]
