"""A tiny MoE model for the CPU: configs/default.py with 8 experts, top-2, per layer."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(num_layers=2, num_experts=8, num_experts_per_tok=2, moe_ungated_d_ff=192,
                 d_ff_multiple_of=64, moe_aux_loss_weight=0.01, moe_z_loss_weight=0.001)
  c.train.update(num_steps=200)
  return c
