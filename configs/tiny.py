"""A seconds-scale smoke-test config: 2 layers of width 64, 32-token rows, batches of 8.

Used by the tests (with their own small corpus) and handy to check a setup end to end.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ungated_d_ff=192,
                 max_seq_len=64, d_ff_multiple_of=64)
  c.data.update(seq_len=32, prefetch=0)
  c.train.update(num_steps=6, global_batch_size=8, warmup_steps=2, log_every=1,
                 checkpoint_every=3, eval_every=0, eval_batches=2, learning_rate=3e-3)
  c.eval.update(batch_size=8, max_batches=2)
  return c
