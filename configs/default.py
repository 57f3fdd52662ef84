"""Default config: a tiny PolyNorm LM that trains in minutes on a 2-core CPU.

Every other config starts from this one and overrides what differs, so the full set of
fields (and their meaning) lives here.
"""

import ml_collections

from polycom_jax import sharding


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- model ---------------------------------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 384            # >= the tokenizer's vocab (byte tokenizer: 258), multiple of 128
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2            # grouped-query attention; = num_heads for plain MHA
  m.head_dim = 0                # 0: d_model // num_heads
  m.activation = "polynorm"     # polynorm | polyrelu | relu | gelu | relu2 | silu | swiglu | geglu
  m.activation_impl = "auto"    # xla | pallas | auto (pallas on GPU/TPU, xla on CPU)
  m.activation_order = 3        # r, the highest power in PolyNorm / PolyReLU
  m.activation_per_expert = False  # MoE only: one PolyCom (w, b) per expert instead of per layer
  m.ungated_d_ff = 576          # MLP width of ungated activations (gated: 384, same params)
  m.d_ff = 0                    # 0: ungated_d_ff, or 2/3 of it for gated ones (parameter match)
  m.d_ff_multiple_of = 128      # the gated width is rounded up to a multiple of this
  m.max_seq_len = 256
  m.rope_theta = 10000.0
  m.norm_eps = 1e-6
  m.qk_norm = "none"            # none | head (per head, Qwen3) | projection (whole q/k, OLMoE)
  m.tie_embeddings = False
  m.init_std = 0.02
  m.output_init_std = 0.0       # attention out / MLP down projections (0: init_std; Megatron:
                                # init_std / sqrt(2 * num_layers))
  m.init_truncation = 0.0       # > 0: normal init truncated at +-this many std (OLMo: 3)
  m.dtype = "auto"              # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU)
  m.param_dtype = "float32"
  m.attention_impl = "auto"     # auto (TPU splash, GPU cudnn, CPU xla), xla, cudnn, splash
  m.document_mask = True        # packed sequences: attend only within the same document
  m.remat = "none"              # none, full, offload, save_matmuls, selective, save_names
                                # (remat.py says what each keeps)
  m.remat_save_names = ""       # remat="save_names": which to keep, e.g. "q,k,v,attn_out"
  m.mlp_chunk = 0               # > 0: the dense MLP runs this many positions at a time (its
                                # backward then holds [B, mlp_chunk, d_ff], not [B, T, d_ff])
  m.scan_layers = False         # stack layers and scan over them (faster compiles at depth)
  # Mixture of experts (0 experts = dense).
  m.num_experts = 0
  m.num_experts_per_tok = 0
  m.moe_ungated_d_ff = 0        # expert MLP width of ungated activations (0: the dense width)
  m.moe_d_ff = 0                # 0: moe_ungated_d_ff, or 2/3 of it for gated ones
  m.moe_impl = "ragged"         # ragged (dropless grouped matmul) | capacity | dispatch (expert
                                # parallel: tokens sent to their experts' devices; moe.py)
  m.moe_capacity_factor = 1.25  # capacity: per expert; dispatch: per destination device
  m.moe_matmul = "auto"         # grouped matmuls: auto (megablox on TPU), ragged_dot, megablox
  m.moe_renormalize = False     # renormalise the top-k router weights to sum to 1
  m.moe_aux_loss_weight = 0.01
  m.moe_z_loss_weight = 0.001

  # --- data ----------------------------------------------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  d.seq_len = 128
  d.tfds_name = "polycom_builtin_corpus"  # any TFDS text dataset prepared in data_dir
  d.data_dir = ""               # "" -> ./data_cache (the built-in corpus is prepared there)
  d.train_split = "train"
  d.eval_split = "validation"
  d.text_feature = "text"
  d.text_glob = ""              # built-in corpus: "" -> Python's standard library sources
  d.tokenizer = "byte"          # byte | sentencepiece | huggingface
  d.tokenizer_path = ""         # .model file (sentencepiece) or tokenizer.json (huggingface)
  d.train_files = ""            # JSONL / Parquet files (glob) instead of a TFDS dataset; the
  d.eval_files = ""             # record field / column is text_feature
  d.prepared = True             # train on rows tokenized once (prepared on first use), globally
                                # shuffled; False: pack on the fly (quick experiments)
  d.prepared_dir = ""           # "" -> DATA_DIR/prepared; one folder per source/tokenizer/seq_len
  d.prepared_train = ""         # a prepared folder to use as it is (checked against this config)
  d.prepared_eval = ""
  d.prepare_workers = 0         # tokenizer processes when preparing (0: the machine's cores)
  d.shuffle_seed = 0
  d.shuffle_buffer_rows = 4096  # on the fly only: rows shuffled in a window of this many
  d.num_workers = 0             # on the fly only: grain worker processes (0: in-process)
  d.prefetch = 2

  # --- training ------------------------------------------------------------------------------
  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 600
  t.global_batch_size = 16
  t.micro_batch_size = 0        # 0: no gradient accumulation
  t.learning_rate = 3e-3
  t.min_learning_rate = 3e-4    # cosine decays to this
  t.warmup_steps = 60
  t.b1 = 0.9
  t.b2 = 0.95
  t.adam_eps = 1e-8
  t.weight_decay = 0.1
  t.weight_decay_rule = "megatron"  # megatron: matrices and embeddings | olmoe: also norm scales
                                # (never the PolyCom coefficients); optimizer.decay_mask
  t.grad_clip = 1.0
  t.z_loss = 0.0
  t.loss_chunk = 512            # head + softmax over this many positions at a time (0: all):
                                # the float32 [batch, seq, vocab] logits are never held whole
  t.log_every = 20
  t.eval_every = 200
  t.eval_batches = 16
  t.checkpoint_every = 200
  t.keep_checkpoints = 3
  t.nonfinite_policy = "skip"   # skip | halt  (skip counts and stops after max_consecutive)
  t.max_consecutive_nonfinite = 5

  # --- evaluation (eval.py) ------------------------------------------------------------------
  e = c.eval = ml_collections.ConfigDict()
  e.batch_size = 16
  e.max_batches = 64            # 0: the whole validation split
  e.acc_norm_per = "chars"      # downstream acc_norm: log-likelihood per character (as
                                # lm-evaluation-harness) or per UTF-8 byte ("bytes")
  e.start_token = "eos"         # downstream requests start with EOS, as training documents do
                                # (and the harness on an export); "none": the context alone

  # --- mesh ----------------------------------------------------------------------------------
  mesh = c.mesh = ml_collections.ConfigDict()
  # Axis sizes multiply to the device count (all processes); one may be -1: the rest.
  mesh.data = -1                # pure data parallel: parameters replicated, gradients all-reduced
  mesh.fsdp = 1                 # data parallel with parameters and optimizer state sharded
  mesh.tensor = 1               # tensor parallel (attention heads, MLP hidden units, vocabulary)
  mesh.expert = 1               # MoE experts
  mesh.dcn_data = 1             # > 1: `data` spans this many TPU slices / GPU nodes (over DCN);
                                # fsdp, tensor and expert then stay inside each slice / node
  # Logical axis name -> mesh axes (a name, a tuple of names, or None: replicated). Parameters
  # use embed/mlp/heads/kv_heads/head_dim/vocab/expert, activations activation_*, input
  # batches batch. Entries replace the defaults of the same name, e.g. keep parameters whole
  # under FSDP: --config.mesh.rules="(('embed', None),)".
  mesh.rules = sharding.DEFAULT_RULES
  return c
