"""The activation comparison at laptop scale: configs/default.py's model, 8 activations x 2 seeds.

Every run sees the same corpus and tokens; gated activations (SwiGLU and the gated PolyCom
forms) get 2/3 of the MLP width so all models have the same parameter count. experiments/compare_activations.py reads `experiment`.
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.model.num_layers = 3
  c.train.update(num_steps=300, warmup_steps=30, log_every=10, eval_every=50, eval_batches=8,
                 checkpoint_every=0)
  c.eval.update(max_batches=32)
  c.experiment = ml_collections.ConfigDict()
  c.experiment.activations = ("polynorm", "polyrelu", "polynorm_glu", "polyrelu_glu", "swiglu",
                               "gelu", "relu", "relu2")
  c.experiment.seeds = (0, 1)
  # Downstream zero-shot tasks after each run (eval.py --tasks syntax, e.g. "arc_easy,piqa" with
  # the TFDS datasets prepared in tasks_data_dir, or "mytask=/path/task.jsonl"); "" = none.
  c.experiment.tasks = ""
  c.experiment.tasks_data_dir = ""
  c.experiment.tasks_limit = 0
  return c
