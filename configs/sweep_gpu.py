"""The activation comparison at ~19M parameters for one H200 (experiments/PROTOCOL.md): prepared
for whoever holds a lent GPU; never run yet (no GPU has been lent to this project).

  python -m experiments.sweep --config=configs/sweep_gpu.py --out=$OUT/sweep_gpu \
      --time_budget_s=540

Needs nothing from the network: the corpus is the Python sources of the machine's own
site-packages (a GPU image holds hundreds of MB of them; prepared on first use, about a minute on
16 cores), the byte tokenizer. 4 activations x (3 learning rates + 2 more seeds) = 20 runs of
40M tokens each (2 tokens per parameter: the 10-minute budget cannot buy 20 per parameter at
this size; the CPU study is the one at 20). Expected about 30-40 s a run on an H200 with bf16
and cuDNN attention, so about 10-13 minutes in all: unmeasured. The runs share one compilation
cache, so the 8 seed runs skip the train step's compile. --time_budget_s=540 starts no run that
would end past 9 minutes (a device call's limit is 10); bring $OUT/sweep_gpu/cache back into the
out directory and the same command runs what is left.
"""

import sysconfig

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.data.update(seq_len=512, text_glob=f"{sysconfig.get_paths()['purelib']}/**/*.py")
  c.model.max_seq_len = 512
  c.train.update(global_batch_size=64, log_every=50, eval_batches=16, keep_checkpoints=1)
  c.eval.update(batch_size=64, max_batches=32)       # 1M held-out tokens
  e = c.experiment = ml_collections.ConfigDict()
  e.title = "one H200, site-packages Python sources, byte tokenizer, ~19M parameters"
  e.activations = ("polynorm", "swiglu", "gelu", "relu2")
  e.reference = "swiglu"
  e.sizes = ml_collections.ConfigDict({
      "m19": {"d_model": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 8,
              "ungated_d_ff": 2048, "d_ff_multiple_of": 64},
  })
  e.moe_activations = ()
  e.tokens_per_param = 2.0
  e.learning_rates = (1e-3, 3e-3, 1e-2)
  e.lr_factor = 3.0
  e.max_lr_extensions = 1
  e.seeds = (0, 1, 2)
  e.min_lr_fraction = 0.1
  e.warmup_fraction = 0.1
  e.evals_per_run = 10
  return c
