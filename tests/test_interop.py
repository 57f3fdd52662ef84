"""Hugging Face / PyTorch interop: Orbax -> Hugging Face -> Orbax is bit-exact, transformers
gives the JAX logits (stock Llama for SwiGLU, the exported remote code for PolyCom MLPs, gated
and ungated), the exported tokenizer and `generate` reproduce the project's ids and greedy
samples, and directories that do not fit the config are refused with the first mismatching
tensor named."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import data as data_lib
from polycom_jax import evaluation, hf_files, hf_layout, interop, model as model_lib
from polycom_jax import param_layouts
from polycom_jax import setup as setup_lib
from polycom_jax.config_errors import ConfigError
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIVATIONS = ("swiglu", "polynorm", "polyrelu", "polynorm_glu", "polyrelu_glu")


def _config(corpus_glob, data_dir, activation):
  """The tiny config with non-default rope theta and norm eps, so a dropped field shows."""
  from conftest import tiny_config
  c = tiny_config(corpus_glob, data_dir)
  c.model.update(activation=activation, rope_theta=500.0, norm_eps=1e-5)
  return c


def _random_like(abstract, seed: int = 0):
  """Random arrays shaped like the abstract params, so that a swapped or misordered tensor
  changes the logits: vectors (norm scales, PolyCom weight and bias) around 1, matrices of
  std 0.2. Built on the host, nothing compiled."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda a: jnp.asarray((a.ndim == 1) + rng.normal(0.0, 0.2, a.shape), a.dtype), abstract)


def _random_state(s: setup_lib.Setup) -> dict:
  """A train state at step 5 with random params."""
  params = _random_like(s.abstract_state["params"])
  return {"step": jnp.int32(5), "params": params, "opt_state": s.tx.init(params)}


@pytest.fixture(scope="module")
def export(tmp_path_factory, corpus_glob, data_dir):
  """activation -> (config, setup, params, workdir, hf_dir): a step-5 checkpoint of a random tiny
  model and its Hugging Face export, made once per activation."""
  cache = {}

  def make(activation: str):
    if activation not in cache:
      config = _config(corpus_glob, data_dir, activation)
      s = setup_lib.setup(config)
      state = _random_state(s)
      workdir = str(tmp_path_factory.mktemp(f"run_{activation}"))
      checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
      checkpointer.save(5, state, {}, setup_lib.config_as_dict(config), force=True)
      checkpointer.close()
      hf_dir = str(tmp_path_factory.mktemp(f"hf_{activation}"))
      assert interop.export_checkpoint(config, workdir, hf_dir) == 5
      cache[activation] = config, s, jax.device_get(state["params"]), workdir, hf_dir
    return cache[activation]

  return make


@pytest.fixture(params=ACTIVATIONS)
def exported(request, export):
  return export(request.param)


def test_export_writes_the_llama_layout(exported):
  config, s, _, _, hf_dir = exported
  mc = s.model_config
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf = json.load(f)
  layer = "model.layers.1."
  assert tensors[layer + "self_attn.q_proj.weight"].shape == (4 * 16, 64)     # [H*Dh, D]
  assert tensors[layer + "self_attn.k_proj.weight"].shape == (2 * 16, 64)     # [K*Dh, D]
  assert tensors[layer + "mlp.down_proj.weight"].shape == (64, mc.d_ff)       # [D, F]
  polycom = mc.activation != "swiglu"
  assert (layer + "mlp.gate_proj.weight" in tensors) == mc.gated
  assert (layer + "mlp.act_fn.weight" in tensors) == polycom
  assert len(tensors) == 3 + 2 * (8 + mc.gated + 2 * polycom)
  if polycom:                # the code that runs it goes with it, named in auto_map
    assert hf["architectures"] == ["PolycomForCausalLM"] and hf["model_type"] == "polycom"
    assert hf["auto_map"]["AutoModelForCausalLM"] == "modeling_polycom.PolycomForCausalLM"
    assert os.path.isfile(os.path.join(hf_dir, "modeling_polycom.py"))
  else:
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert "auto_map" not in hf and not os.path.exists(os.path.join(hf_dir, "modeling_polycom.py"))
  assert hf["hidden_act"] == {"swiglu": "silu", "polynorm_glu": "poly_norm",
                              "polyrelu_glu": "poly_relu"}.get(mc.activation, mc.activation)
  assert (hf["rms_norm_eps"], hf["rope_theta"], hf["torch_dtype"]) == (1e-5, 500.0, "float32")
  assert (hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"]) == (2, 16, mc.d_ff)
  assert hf["polycom_activation"] == mc.activation and hf["mlp_gated"] == mc.gated
  assert hf["polycom_jax"] == {"model": config.model.to_dict(), "step": 5}
  assert hf["eos_token_id"] == s.tokenizer.eos_id


def test_round_trip_is_bit_exact(exported, tmp_path):
  config, _, params, _, hf_dir = exported
  path = interop.import_checkpoint(config, hf_dir, str(tmp_path))
  assert path == os.path.join(str(tmp_path), "checkpoints", "0")
  _, restored, step = evaluation.restore_params(config, str(tmp_path))
  assert step == 0
  flat_a, tree_a = jax.tree.flatten(params)
  flat_b, tree_b = jax.tree.flatten(jax.device_get(restored))
  assert tree_a == tree_b
  for a, b in zip(flat_a, flat_b):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_scanned_layers_export_the_same_tensors_and_import_back(export, tmp_path):
  """A scan_layers=True checkpoint of the same weights (stacked) exports the unrolled model's
  tensors bit for bit, and importing that directory with scan_layers=True stacks them again."""
  config, _, params, _, hf_dir = export("polynorm")
  scanned = config.copy_and_resolve_references()
  scanned.model.scan_layers = True
  s = setup_lib.setup(scanned)
  stacked = param_layouts.stack_layers(nnx.to_pure_dict(params))
  state_params = jax.tree.map(lambda a: a, s.abstract_state["params"])
  nnx.replace_by_pure_dict(state_params, jax.tree.map(jnp.asarray, stacked))
  workdir = str(tmp_path / "scanned_run")
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(5, {"step": jnp.int32(5), "params": state_params,
                        "opt_state": s.tx.init(state_params)}, {},
                    setup_lib.config_as_dict(scanned), force=True)
  checkpointer.close()
  out = str(tmp_path / "hf_scanned")
  interop.export_checkpoint(scanned, workdir, out)
  a = load_file(os.path.join(hf_dir, "model.safetensors"))
  b = load_file(os.path.join(out, "model.safetensors"))
  assert a.keys() == b.keys() and any(".layers.1." in n for n in a)
  for name in a:
    np.testing.assert_array_equal(b[name], a[name], err_msg=name)

  interop.import_checkpoint(scanned, hf_dir, str(tmp_path / "imported"))
  _, restored, _ = evaluation.restore_params(scanned, str(tmp_path / "imported"))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(jax.device_get(restored)),
               jax.device_get(stacked))


def test_import_writes_a_fresh_state_that_training_resumes_from(export, tmp_path):
  """Step 0, a fresh optimizer state (zero moments and counts) and a fresh train iterator's data
  position, restored into the run's abstract state."""
  config, s, _, _, hf_dir = export("polynorm")
  interop.import_checkpoint(config, hf_dir, str(tmp_path))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  state, data_state = checkpointer.restore(0, s.abstract_state)
  checkpointer.close()
  assert int(state["step"]) == 0
  assert all(not np.any(x) for x in jax.tree.leaves(state["opt_state"]))
  it = data_lib.make_train_iterator(config.data, s.tokenizer, batch_size=8, seed=0)
  first = next(it)
  it.set_state(data_state)
  np.testing.assert_array_equal(next(it)["inputs"], first["inputs"])


# ------------------------------------------------------------------------------------------------
# PyTorch: transformers' Llama on the exported directory gives the JAX model's logits

@pytest.fixture(scope="module")
def torch_llama():
  """torch and transformers' Llama module (test-only dependencies, in requirements-dev.txt)."""
  torch = pytest.importorskip("torch")
  modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
  return torch, modeling_llama


def _hf_model(hf_dir):
  """transformers' model for the directory, as a user loads it (remote code where it has some);
  every tensor of the file used once."""
  import torch
  from transformers import AutoModelForCausalLM
  model, info = AutoModelForCausalLM.from_pretrained(
      hf_dir, trust_remote_code=True, output_loading_info=True, attn_implementation="eager",
      dtype=torch.float32)
  assert not any(info.values()), info          # no missing, unexpected or mismatched tensor
  return model


def test_transformers_gives_the_jax_logits(exported, torch_llama):
  import torch
  config, s, params, _, hf_dir = exported
  tokens = np.random.RandomState(0).randint(0, s.tokenizer.vocab_size, (2, 24))
  want = np.asarray(nnx.merge(s.graphdef, params)(jnp.asarray(tokens)))    # [B, T, V]
  model = _hf_model(hf_dir)
  assert type(model).__name__ == ("LlamaForCausalLM" if config.model.activation == "swiglu" else
                                   "PolycomForCausalLM")
  with torch.no_grad():
    got = model(torch.as_tensor(tokens)).logits.numpy()
  scale = np.abs(want).max()
  assert scale > 1.0                             # the logits are not trivially small
  # float32 on both sides; the gated PolyReLU's cubes make it the least exact (1.4e-5 at 3.3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_stock_transformers_refuses_remote_code_with_its_own_message(export, torch_llama):
  from transformers import AutoModelForCausalLM
  _, _, _, _, hf_dir = export("polynorm_glu")
  with pytest.raises(ValueError, match="trust_remote_code"):
    AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=False)


def test_exported_tokenizer_and_generate_reproduce_the_greedy_sample(export, torch_llama):
  """AutoTokenizer on the export encodes as training does (EOS first, then the UTF-8 bytes), and
  transformers' greedy generate continues a prompt with evaluation.generate's tokens."""
  import torch
  from transformers import AutoTokenizer
  _, s, params, _, hf_dir = export("polynorm")
  tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
  prompt = "Größe def "
  ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
  assert ids[0].tolist() == [s.tokenizer.eos_id] + s.tokenizer.encode(prompt)
  want = evaluation.generate(s, params, prompt, max_new_tokens=6)
  out = _hf_model(hf_dir).generate(ids, max_new_tokens=6)   # greedy: generation_config.json
  new = out[0, ids.shape[1]:].tolist()
  assert len(new) == 6 and max(new) < 256        # no EOS (it would stop both) and only bytes
  assert tokenizer.decode(new) == want           # invalid UTF-8 decodes to U+FFFD on both sides


def test_gated_polynorm_export_uses_motifs_names(export):
  """Motif's gated PolyNorm MLP: gate/up/down projections and act_fn.weight [3], .bias [1]."""
  _, _, _, _, hf_dir = export("polynorm_glu")
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  mlp = {n.removeprefix("model.layers.0.mlp."): t.shape for n, t in tensors.items()
         if n.startswith("model.layers.0.mlp.")}
  f = mlp["up_proj.weight"][0]
  assert mlp == {"gate_proj.weight": (f, 64), "up_proj.weight": (f, 64),
                 "down_proj.weight": (64, f), "act_fn.weight": (3,), "act_fn.bias": (1,)}


# ------------------------------------------------------------------------------------------------
# Directories that do not fit the config

def _edited_copy(hf_dir, dest, edit_tensors=None, edit_config=None) -> str:
  shutil.copytree(hf_dir, dest)
  tensors = load_file(os.path.join(dest, "model.safetensors"))
  with open(os.path.join(dest, "config.json")) as f:
    hf = json.load(f)
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(hf)
  hf_files.write_hf_dir(dest, tensors, hf)
  return str(dest)


def _rename(tensors, old, new):
  tensors[new] = tensors.pop(old)


@pytest.mark.parametrize("edit_tensors, edit_config, message", [
    (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((256, 64), np.float32)}),
     None, r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \[256, 64\], but this "
           r"config\.model expects \[192, 64\]"),
    (lambda t: _rename(t, "model.layers.0.mlp.act_fn.weight", "model.layers.0.mlp.act.weight"),
     None, r"tensor model\.layers\.0\.mlp\.act_fn\.weight is missing \(expected shape \[3\].*"
           r"unexpected tensors found: \['model\.layers\.0\.mlp\.act\.weight'\]"),
    (lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": np.zeros((192, 64), np.float32)}),
     None, r"unexpected tensor model\.layers\.0\.mlp\.gate_proj\.weight"),
    (None, lambda c: c.update(num_attention_heads=8, head_dim=8),
     r"config\.json: num_attention_heads is 8, but config\.model\.num_heads=4 gives 4"),
    (None, lambda c: c.update(hidden_act="polyrelu", polycom_activation="polyrelu"),
     r"hidden_act is 'polyrelu', but config\.model\.activation='polynorm'"),
    (None, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     r"rope_theta is 10000\.0, but config\.model\.rope_theta=500\.0"),
])
def test_mismatched_directory_is_refused(export, tmp_path, edit_tensors, edit_config, message):
  config, _, _, _, hf_dir = export("polynorm")
  bad = _edited_copy(hf_dir, tmp_path / "bad", edit_tensors, edit_config)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    interop.import_checkpoint(config, bad, str(workdir))
  assert not os.path.exists(workdir / "checkpoints")          # nothing written


def test_missing_files_and_moe_outside_the_olmoe_layout_are_refused(tiny, tmp_path):
  with pytest.raises(ConfigError, match="no config.json"):
    hf_files.read_hf_dir(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ConfigError, match="no model.safetensors"):
    hf_files.read_hf_dir(str(tmp_path))
  config = tiny()
  config.model.update(num_experts=4, num_experts_per_tok=2)
  with pytest.raises(ConfigError, match="OLMoE's layout.*qk_norm='projection'"):
    interop.export_checkpoint(config, str(tmp_path), str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------
# Pure mappings and configs

def _model_config(**overrides) -> model_lib.ModelConfig:
  from configs import tiny
  c = tiny.get_config()
  c.model.update(overrides)
  return model_lib.ModelConfig.from_config(c.model)


def test_qk_norm_and_tied_embeddings_match_transformers_qwen3(torch_llama):
  """QK-norm scales take Qwen3's names and architecture (its q/k norm is per head, as here), tied
  models have no lm_head.weight; the round trip is exact and Qwen3ForCausalLM gives the logits."""
  torch, _ = torch_llama
  qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
  mc = _model_config(activation="geglu", tie_embeddings=True, qk_norm="head", rope_theta=500.0)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(mc, nnx.Rngs(0)))
  state = _random_like(nnx.state(abstract, nnx.Param), seed=1)
  params = jax.device_get(nnx.to_pure_dict(state))
  tensors = hf_layout.to_hf_state_dict(params, mc)
  assert "lm_head.weight" not in tensors
  assert tensors["model.layers.0.self_attn.k_norm.weight"].shape == (16,)
  jax.tree.map(np.testing.assert_array_equal, hf_layout.from_hf_state_dict(tensors, mc), params)
  hf = interop.hf_config(mc)
  assert (hf["architectures"], hf["hidden_act"]) == (["Qwen3ForCausalLM"], "gelu")
  assert interop.model_fields_from_hf(hf)["qk_norm"] == "head"

  tokens = np.random.RandomState(0).randint(0, mc.vocab_size, (2, 24))
  want = np.asarray(nnx.merge(nnx.graphdef(abstract), state)(jnp.asarray(tokens)))
  assert np.abs(want).max() > 1.0
  torch_model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(**hf, attn_implementation="eager"))
  torch_model.load_state_dict({n: torch.from_numpy(np.array(t)) for n, t in tensors.items()},
                              strict=False)
  missing = set(torch_model.state_dict()) - set(tensors)
  assert missing == {"lm_head.weight"}           # tied: it is the embedding table
  with torch.no_grad():
    got = torch_model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_remote_code_with_qk_norm_gives_the_jax_logits(torch_llama, tmp_path):
  """PolyReLU with per-head QK-norm: the remote code takes Qwen3's attention, the directory reads
  back (without its polycom_jax block) as the same model fields."""
  import torch
  mc = _model_config(activation="polyrelu", qk_norm="head", rope_theta=500.0, activation_order=2)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(mc, nnx.Rngs(0)))
  state = _random_like(nnx.state(abstract, nnx.Param), seed=2)
  hf = interop.hf_config(mc)
  assert hf["architectures"] == ["PolycomForCausalLM"] and hf["qk_norm"] is True
  fields = interop.model_fields_from_hf(hf)
  assert (fields["qk_norm"], fields["activation"], fields["activation_order"]) == (
      "head", "polyrelu", 2)
  interop.write_model_dir(str(tmp_path), hf_layout.to_hf_state_dict(
      jax.device_get(nnx.to_pure_dict(state)), mc), hf, mc)
  tokens = np.random.RandomState(0).randint(0, mc.vocab_size, (2, 24))
  want = np.asarray(nnx.merge(nnx.graphdef(abstract), state)(jnp.asarray(tokens)))
  with torch.no_grad():
    got = _hf_model(str(tmp_path))(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_model_fields_from_a_plain_llama_config(torch_llama):
  """A stock transformers Llama config (no PolyCom fields) reads as a swiglu ModelConfig that
  passes the config.json check."""
  _, modeling_llama = torch_llama
  hf = modeling_llama.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=2000.0,
      max_position_embeddings=128).to_dict()
  mc = model_lib.ModelConfig.from_config(_fields_on_default(interop.model_fields_from_hf(hf)))
  assert (mc.activation, mc.d_ff, mc.num_kv_heads, mc.head_dim) == ("swiglu", 160, 1, 16)
  assert (mc.rope_theta, mc.norm_eps, mc.max_seq_len) == (2000.0, 1e-5, 128)
  interop.check_hf_config(hf, mc, "config.json")


def _fields_on_default(fields: dict):
  from configs import default
  c = default.get_config()
  c.model.update(fields)
  return c.model


def _convert(config, *args) -> subprocess.CompletedProcess:
  """convert.py on configs/tiny.py with the test corpus, on 4 CPU devices as a 2 x 2 mesh
  (fsdp x tensor), so the checkpoint is read and written sharded."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  return subprocess.run(
      [sys.executable, "convert.py", "--config=configs/tiny.py", "--config.mesh.fsdp=2",
       "--config.mesh.tensor=2", f"--config.data.text_glob={config.data.text_glob}",
       f"--config.data.data_dir={config.data.data_dir}", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_convert_cli_exports_the_same_files(export, tmp_path):
  config, _, _, workdir, hf_dir = export("polyrelu")
  overrides = [f"--config.model.{k}={config.model[k]}" for k in ("activation", "rope_theta",
                                                                  "norm_eps")]
  proc = _convert(config, "--direction=export", *overrides, f"--workdir={workdir}",
                  f"--hf_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr
  assert "exported step 5" in proc.stdout
  for name in ("model.safetensors", "config.json"):
    assert (tmp_path / name).read_bytes() == open(os.path.join(hf_dir, name), "rb").read()


def test_convert_cli_imports_with_the_model_from_the_directory(export, tmp_path):
  """--model_from_hf prints the overrides that make eval.py's config match the checkpoint; the
  checkpoint written on a 2 x 2 mesh restores bit-exact on this process's one device."""
  config, _, params, _, hf_dir = export("polyrelu")
  proc = _convert(config, "--direction=import", "--model_from_hf", f"--hf_dir={hf_dir}",
                  f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr
  printed = proc.stdout.split("add ")[1].split("\n")[0].split()
  assert sorted(printed) == ["--config.model.activation=polyrelu",
                             "--config.model.norm_eps=1e-05", "--config.model.rope_theta=500.0"]
  _, restored, step = evaluation.restore_params(config, str(tmp_path))
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), params)
  again = _convert(config, "--direction=import", "--model_from_hf", f"--hf_dir={hf_dir}",
                   f"--workdir={tmp_path}")
  assert again.returncode == 2 and "already has checkpoints [0]" in again.stderr


# ------------------------------------------------------------------------------------------------
# MoE in OLMoE's layout (transformers' OlmoeForCausalLM)

@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
  """(hf_dir, torch model): a random tiny OlmoeForCausalLM (float32), saved with
  save_pretrained (per-expert tensors), weights far from their init so a swap shows."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.OlmoeConfig(
      vocab_size=384, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0, norm_topk_prob=False,
      eos_token_id=257, pad_token_id=256, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.OlmoeForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_((p.ndim == 1) + 0.2 * torch.randn_like(p))
  hf_dir = str(tmp_path_factory.mktemp("olmoe"))
  model.save_pretrained(hf_dir)
  return hf_dir, model


def _olmoe_config(corpus_glob, data_dir, hf: dict):
  from conftest import tiny_config
  c = tiny_config(corpus_glob, data_dir)
  c.model.update(**interop.model_fields_from_hf(hf), document_mask=False, dtype="float32")
  return c


def test_olmoe_import_and_export_match_transformers(olmoe_dir, corpus_glob, data_dir, tmp_path):
  """save_pretrained's per-expert tensors import to the same logits (float32); an import of the
  fused in-memory layout (experts.gate_up_proj / down_proj) gives the same params; the export
  holds the same tensors and loads back into OlmoeForCausalLM with the same logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_dir, torch_model = olmoe_dir
  hf, tensors = hf_files.read_hf_dir(hf_dir)
  assert "model.layers.0.mlp.experts.3.gate_proj.weight" in tensors     # what 5.x writes
  config = _olmoe_config(corpus_glob, data_dir, hf)
  mc = model_lib.ModelConfig.from_config(config.model)
  assert (mc.num_experts, mc.moe_d_ff, mc.qk_norm, mc.activation) == (4, 32, "projection",
                                                                      "swiglu")
  interop.check_hf_config(hf, mc, where="config.json")
  params = hf_layout.from_hf_state_dict(tensors, mc)
  fused = {n: p.detach().numpy() for n, p in torch_model.state_dict().items()}
  assert "model.layers.0.mlp.experts.gate_up_proj" in fused
  jax.tree.map(np.testing.assert_array_equal, hf_layout.from_hf_state_dict(fused, mc), params)

  abstract = nnx.eval_shape(lambda: model_lib.Transformer(mc, nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  tokens = np.random.RandomState(0).randint(0, 384, (2, 24))
  ours = np.asarray(nnx.merge(nnx.graphdef(abstract), state)(jnp.asarray(tokens)))
  with torch.no_grad():
    want = torch_model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)

  # The checkpoint path: import into a workdir, export it again.
  interop.import_checkpoint(config, hf_dir, str(tmp_path / "run"))
  out = str(tmp_path / "export")
  interop.export_checkpoint(config, str(tmp_path / "run"), out)
  hf2, tensors2 = hf_files.read_hf_dir(out)
  assert hf2["architectures"] == ["OlmoeForCausalLM"] and hf2["intermediate_size"] == 32
  assert set(tensors2) == set(tensors)
  for name, t in tensors.items():
    np.testing.assert_array_equal(tensors2[name], t, err_msg=name)
  reloaded = transformers.OlmoeForCausalLM.from_pretrained(out, attn_implementation="eager")
  with torch.no_grad():
    again = reloaded.eval()(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(again, want, rtol=1e-5, atol=1e-5)


def test_olmoe_layout_refuses_per_head_qk_norm():
  mc = _model_config(num_experts=4, num_experts_per_tok=2, moe_ungated_d_ff=96, qk_norm="head")
  with pytest.raises(ConfigError, match="qk_norm"):
    hf_layout.check_supported(mc)


@pytest.mark.parametrize("per_expert", [False, True], ids=["shared", "per_expert"])
def test_polycom_experts_round_trip_with_their_coefficients(per_expert):
  """PolyNorm experts (ungated: no gate_proj) in the OLMoE layout, their coefficients as extra
  tensors (mlp.act_fn.* shared, mlp.experts.N.act_fn.* per expert), scanned layers; exact."""
  mc = _model_config(activation="polynorm", num_experts=4, num_experts_per_tok=2,
                     moe_ungated_d_ff=96, qk_norm="projection", scan_layers=True,
                     activation_per_expert=per_expert)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(mc, nnx.Rngs(0)))
  params = jax.device_get(nnx.to_pure_dict(_random_like(nnx.state(abstract, nnx.Param))))
  tensors = hf_layout.to_hf_state_dict(params, mc)
  layer = "model.layers.1.mlp."
  assert tensors[layer + "experts.2.up_proj.weight"].shape == (96, 64)
  assert layer + "experts.2.gate_proj.weight" not in tensors
  coefficient = layer + ("experts.3.act_fn.weight" if per_expert else "act_fn.weight")
  assert tensors[coefficient].shape == (3,)
  jax.tree.map(np.testing.assert_array_equal, hf_layout.from_hf_state_dict(tensors, mc), params)


def test_export_over_an_older_sharded_export_leaves_no_stale_index(tmp_path):
  """A folder that held a sharded export (index + shards): writing one file removes them, so
  a later import reads the new weights, not the old index's."""
  out = tmp_path / "hf"
  out.mkdir()
  old = {"a": np.zeros((2, 2), np.float32)}
  from safetensors.numpy import save_file
  save_file(old, str(out / "model-00001-of-00002.safetensors"))
  (out / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
  hf_files.write_hf_dir(str(out), {"a": np.ones((2, 2), np.float32)}, {"model_type": "llama"})
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  _, tensors = hf_files.read_hf_dir(str(out))
  np.testing.assert_array_equal(tensors["a"], 1.0)


def test_damaged_hf_files_are_named(tmp_path):
  (tmp_path / "config.json").write_text("{broken")
  with pytest.raises(ConfigError, match="config.json is not valid JSON"):
    hf_files.read_hf_dir(str(tmp_path))
  hf_files.write_hf_dir(str(tmp_path), {"a": np.ones((64, 64), np.float32)}, {})
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  with pytest.raises(ConfigError, match="model.safetensors cannot be read.*truncated"):
    hf_files.read_hf_dir(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Tokenizers in the export

def _sentencepiece_model(tmp_path, model_type: str = "unigram") -> str:
  import random
  import sentencepiece as spm
  rng = random.Random(0)
  words = "the lazy fox packs rows quick brown jumps over ünïcode data model".split()
  (tmp_path / "train.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12))
                                                for _ in range(300)))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_type=model_type,
                                 model_prefix=str(tmp_path / model_type), vocab_size=320,
                                 byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
  return str(tmp_path / f"{model_type}.model")


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "huggingface"])
def test_exported_tokenizers_encode_as_training_does(kind, tmp_path, torch_llama):
  """AutoTokenizer on the written files gives the run tokenizer's ids (EOS first with special
  tokens for byte and SentencePiece) and decodes them back, on text with odd whitespace, NFKC
  cases, characters outside the vocabulary (byte fallback) and emoji."""
  import ml_collections
  from transformers import AutoTokenizer
  from polycom_jax import hf_tokenizer
  path = {"byte": "", "sentencepiece": lambda: _sentencepiece_model(tmp_path),
          "huggingface": lambda: _hf_tokenizer_json(tmp_path)}[kind]
  data_config = ml_collections.ConfigDict({"tokenizer": kind,
                                           "tokenizer_path": path() if path else ""})
  ours = data_lib.get_tokenizer(data_config)
  out = tmp_path / "export"
  out.mkdir()
  hf_tokenizer.write(hf_tokenizer.tokenizer_files(data_config, ours), str(out))
  theirs = AutoTokenizer.from_pretrained(str(out))
  start = [] if kind == "huggingface" else [ours.eos_id]
  for text in ("the lazy fox packs rows", "  two  spaces\tand\nlines ", "ﬁne Ａｂｃ ünïcode 🌍 日本"):
    assert theirs(text)["input_ids"] == start + ours.encode(text), text
    assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))
  assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id


def _hf_tokenizer_json(tmp_path) -> str:
  import tokenizers as hf
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the lazy fox packs rows quick brown"] * 50, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  return str(tmp_path / "tokenizer.json")


def test_sentencepiece_bpe_models_are_refused_before_writing(tmp_path):
  import ml_collections
  from polycom_jax import hf_tokenizer
  data_config = ml_collections.ConfigDict({"tokenizer": "sentencepiece",
                                           "tokenizer_path": _sentencepiece_model(tmp_path, "bpe")})
  with pytest.raises(ConfigError, match="only SentencePiece Unigram"):
    hf_tokenizer.tokenizer_files(data_config, data_lib.get_tokenizer(data_config))
