"""The activation comparison sized for 2 CPU cores (experiments/PROTOCOL.md): two dense sizes and
one small MoE on the built-in corpus, byte tokenizer, 20 tokens per parameter, a learning-rate
sweep per activation, 3 seeds at the best rate.

  python -m experiments.sweep --config=configs/sweep_cpu.py --out=experiments/results/sweep_cpu

Every model keeps configs/default.py's recipe (AdamW, cosine to 1/10 of the peak, 10% warmup,
weight decay 0.1, clip 1.0, init std 0.02); gated MLPs get 2/3 of the ungated width, so each
size has the same parameter count for every activation (up to PolyCom's 4 coefficients per
layer). See experiments/PROTOCOL.md for the budget.
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.data.seq_len = 128
  c.train.update(global_batch_size=32, log_every=25, eval_batches=8, keep_checkpoints=1)
  c.eval.update(batch_size=32, max_batches=48)      # 196,608 held-out tokens
  e = c.experiment = ml_collections.ConfigDict()
  e.title = "2 CPU cores, built-in corpus (Python stdlib), byte tokenizer"
  e.activations = ("polynorm", "polyrelu", "polynorm_glu", "swiglu", "gelu", "relu2")
  e.reference = "swiglu"
  # Model sizes (config.model fields). moe* sizes are the MoE arms, run for moe_activations.
  # xs 92k and s 148k parameters (a third of them the byte embeddings and head); d_ff rounded to
  # 16, so gated and ungated MLPs differ by under 1.4% in parameters.
  e.sizes = ml_collections.ConfigDict({
      "xs": {"d_model": 48, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
             "ungated_d_ff": 192, "d_ff_multiple_of": 16},
      "s": {"d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
            "ungated_d_ff": 256, "d_ff_multiple_of": 16},
      "moe_xs": {"d_model": 48, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
                 "ungated_d_ff": 192, "d_ff_multiple_of": 16, "num_experts": 4,
                 "num_experts_per_tok": 2, "moe_ungated_d_ff": 96},
  })
  e.moe_activations = ("polynorm", "swiglu")
  e.tokens_per_param = 20.0
  e.learning_rates = (3e-3, 1e-2, 3e-2)   # log-spaced; extended past an edge that wins
  e.lr_factor = 3.0
  e.max_lr_extensions = 2
  e.seeds = (0, 1, 2)                     # the first seed runs the learning-rate sweep
  e.min_lr_fraction = 0.1
  e.warmup_fraction = 0.1
  e.evals_per_run = 10
  return c
