"""The paper's 1B dense model (Llama-2 architecture, Megatron), as in the authors' scripts.

Every setting against the reference run, "same" or "differs, because ...":
docs/reference_runs.md.

24 layers, d_model 2048, 16 heads (no GQA), RMSNorm, RoPE, untied embeddings, no biases;
ungated MLP width 8256 (SwiGLU 5504: equal parameters); seq 4096, global batch 64 sequences
(262,144 tokens); AdamW (0.9, 0.95), weight decay 0.1 on matrices and embeddings only
(Megatron's rule: not on norm scales or the PolyCom coefficients), clip 1.0, init std 0.013975
(attention out and MLP down projections 0.013975 / sqrt(2 * 24) = 0.002017), no document
masking (packed documents attend across boundaries, positions 0..4095, as the run script), lr 3e-4
cosine to 3e-5 with 620M warmup tokens, 100B training tokens (the scripts' default; the released
models saw 250B: --config.train.num_steps=953675). Data: RedPajama with the Llama tokenizer in
the paper; here any TFDS text dataset prepared in data_dir (c4 by default) and a SentencePiece
model given by --config.data.tokenizer_path.

Mesh: FSDP over all devices (8 GPUs, or a v5p-32 slice's 16 chips: parameters and Adam state,
~16 GB in float32, shard 8 or 16 ways; 64 sequences = 8 or 4 per device) with full
rematerialisation and the layers scanned (one compiled block). attention_impl auto is splash
attention on TPU and cuDNN's flash attention on GPU (bf16), like the reference's flash attention,
and the loss runs 512 positions at a time (train.loss_chunk). Compiled ahead of time for a v5e-16
(16 GiB per chip): 0.94 GiB of state + 6.3 GiB of scratch per chip at the paper's batch; the
largest batch that fits is 160, and 800 with --config.model.remat=offload (block inputs in host
memory) --config.model.mlp_chunk=512 (benchmarks/RESULTS.md, "TPU compile check"). Megatron's
selective recompute, as the reference ran it: --config.model.remat=selective (more memory, fewer
FLOPs; for chips with more HBM). With less memory,
--config.train.micro_batch_size=32 (gradient accumulation) roughly halves the scratch. Several
TPU slices or GPU nodes joined by DCN: data
parallel across them, FSDP inside each, e.g. 2 x v5p-32: --config.mesh.data=2
--config.mesh.dcn_data=2 (fsdp -1 then fills each slice); across 4 GPU nodes with InfiniBand,
plain --config.mesh.fsdp=-1 over all 32 GPUs also works.
"""

import math

from configs import default

TOKENS_PER_STEP = 64 * 4096


def get_config():
  c = default.get_config()
  c.model.update(
      vocab_size=32000, d_model=2048, num_layers=24, num_heads=16, num_kv_heads=16,
      ungated_d_ff=8256, d_ff_multiple_of=128, max_seq_len=4096, rope_theta=10000.0,
      norm_eps=1e-5, init_std=0.013975, output_init_std=0.013975 / math.sqrt(2 * 24),
      init_truncation=0.0, qk_norm="none", tie_embeddings=False, remat="full",
      scan_layers=True, dtype="auto", document_mask=False)
  c.data.update(seq_len=4096, tfds_name="c4", data_dir="", text_feature="text",
                train_split="train", eval_split="validation", tokenizer="sentencepiece",
                tokenizer_path="", num_workers=4)
  c.train.update(
      num_steps=100_000_000_000 // TOKENS_PER_STEP, global_batch_size=64, micro_batch_size=0,
      learning_rate=3e-4, min_learning_rate=3e-5, warmup_steps=620_000_000 // TOKENS_PER_STEP,
      b1=0.9, b2=0.95, adam_eps=1e-8, weight_decay=0.1, weight_decay_rule="megatron",
      grad_clip=1.0, log_every=10,
      eval_every=1000, eval_batches=50, checkpoint_every=1000, keep_checkpoints=3)
  c.eval.update(batch_size=64, max_batches=200)
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1, dcn_data=1)
  return c
