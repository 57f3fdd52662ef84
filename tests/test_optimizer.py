"""Weight decay by what a parameter is (both layouts, per-expert coefficients, both reference
rules), the initialisation the paper configs ask for, and the learning rate as optax applies it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default, paper_dense_1b, paper_moe
from polycom_jax import model as model_lib
from polycom_jax import optimizer as opt_lib
from polycom_jax import setup as setup_lib
from polycom_jax import steps as steps_lib

MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_ungated_d_ff": 96}


def _params(scan_layers: bool, **overrides):
  cfg = default.get_config()
  cfg.model.update(num_layers=2, scan_layers=scan_layers, **overrides)
  mc = model_lib.ModelConfig.from_config(cfg.model)
  return nnx.state(model_lib.Transformer(mc, nnx.Rngs(0)), nnx.Param)


def _expected(path: tuple, rule: str) -> bool:
  """Written from the references, by parameter name (not by the code's kinds)."""
  name = path[-1]
  if path[-2:] in (("act", "weight"), ("act", "bias")) or name in ("act_weight", "act_bias"):
    return False                                # PolyCom coefficients: never (both references)
  if name == "scale":
    return rule == "olmoe"                      # norms: OLMo decays them, Megatron does not
  return True                                   # projections, router, embeddings


@pytest.mark.parametrize("rule", list(opt_lib.DECAY_RULES))
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("overrides", [
    {"activation": "polynorm", "qk_norm": "projection"},
    {"activation": "polyrelu", **MOE, "activation_per_expert": True},
    {"activation": "polynorm", **MOE},
], ids=["dense", "moe-per-expert", "moe-shared"])
def test_decay_mask_follows_the_rule_in_both_layouts(rule, scan_layers, overrides):
  params = _params(scan_layers, **overrides)
  mask = opt_lib.decay_mask(params, rule)
  flat = nnx.to_flat_state(mask)
  assert len(flat) == len(nnx.to_flat_state(params)) > 10
  for path, decayed in flat:
    assert bool(decayed.get_value()) == _expected(path, rule), path
  assert any(not _expected(path, "olmoe") for path, _ in flat)     # coefficients are there
  assert any(path[-1] == "scale" for path, _ in flat)


def test_the_optimizer_decays_exactly_the_masked_parameters():
  """With zero gradients AdamW's update is -lr * weight_decay * p on decayed parameters and 0
  elsewhere (so the mask is wired into the optimizer, not only computed)."""
  cfg = default.get_config()
  cfg.model.update(num_layers=2, scan_layers=True, activation="polynorm")
  cfg.train.update(warmup_steps=0, learning_rate=0.5, weight_decay=0.1, grad_clip=0.0,
                   weight_decay_rule="megatron")
  mc = model_lib.ModelConfig.from_config(cfg.model)
  params = nnx.state(model_lib.Transformer(mc, nnx.Rngs(0)), nnx.Param)
  tx = opt_lib.make_optimizer(cfg.train)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for (path, u), (_, p) in zip(nnx.to_flat_state(updates), nnx.to_flat_state(params)):
    expected = -0.5 * 0.1 * p[...] if _expected(path, "megatron") else np.zeros(p.shape)
    np.testing.assert_allclose(u[...], expected, rtol=1e-6, atol=1e-9, err_msg=str(path))


def _std_by_name(mc) -> dict[str, list[float]]:
  params = nnx.state(model_lib.Transformer(mc, nnx.Rngs(0)), nnx.Param)
  out = {}
  for path, v in nnx.to_flat_state(params):
    out.setdefault(path[-1], []).append(np.asarray(v[...], np.float64))
  return out


def test_paper_dense_init_scales_the_output_projections():
  """Megatron: attention out and MLP down projections at init_std / sqrt(2 * num_layers), every
  other matrix at init_std (paper_dense_1b, narrowed, all 24 layers)."""
  cfg = paper_dense_1b.get_config()
  cfg.model.update(d_model=256, num_heads=4, num_kv_heads=4, ungated_d_ff=512, vocab_size=512)
  mc = model_lib.ModelConfig.from_config(cfg.model)
  assert mc.num_layers == 24 and mc.init_truncation == 0
  by_name = _std_by_name(mc)
  scaled = 0.013975 / math.sqrt(48)
  for name, std in (("wq", 0.013975), ("wk", 0.013975), ("wv", 0.013975), ("w_up", 0.013975),
                    ("embed", 0.013975), ("lm_head", 0.013975), ("wo", scaled),
                    ("w_down", scaled)):
    values = np.concatenate([a.ravel() for a in by_name[name]])
    np.testing.assert_allclose(values.std(), std, rtol=0.02, err_msg=name)
  assert abs(scaled - 0.00202) < 1e-5
  np.testing.assert_array_equal(np.concatenate([a.ravel() for a in by_name["scale"]]), 1.0)


def test_paper_moe_init_is_truncated_at_three_std():
  cfg = paper_moe.get_config()
  cfg.model.update(d_model=128, num_heads=4, num_kv_heads=4, num_layers=2, num_experts=4,
                   num_experts_per_tok=2, moe_ungated_d_ff=192, vocab_size=512)
  mc = model_lib.ModelConfig.from_config(cfg.model)
  by_name = _std_by_name(mc)
  # A normal cut at +-3 std keeps std * 0.98658 (the truncated distribution's own std).
  for name in ("wq", "w_up", "w_down", "router", "embed", "lm_head"):
    values = np.concatenate([a.ravel() for a in by_name[name]])
    assert np.abs(values).max() <= 3 * 0.02 + 1e-7, name
    np.testing.assert_allclose(values.std(), 0.02 * 0.98658, rtol=0.03, err_msg=name)


@pytest.fixture(scope="module")
def lr_setup(corpus_glob, data_dir):
  from conftest import tiny_config
  config = tiny_config(corpus_glob, data_dir, num_steps=4, warmup_steps=0, learning_rate=1e-2,
                       min_learning_rate=1e-3, grad_clip=0.0, weight_decay=0.0)
  s = setup_lib.setup(config)
  from polycom_jax import data as data_lib
  it = data_lib.make_train_iterator(s.config.data, s.tokenizer, batch_size=8, seed=0)
  batch = next(it)
  it.close()
  return s, batch, steps_lib.make_train_step(s)


def _bias(state) -> float:
  return float(jax.device_get(state["params"]["layers"][0]["mlp"]["act"]["bias"][...])[0])


def test_logged_lr_is_the_applied_one_after_a_skipped_step(lr_setup):
  """Step 1 is non-finite (skipped: optax's count stays 0); step 2 applies schedule(0), the peak,
  and logs it. Adam's first move of a parameter is lr * g / (|g| + eps), i.e. lr: the PolyNorm
  bias moves by the logged lr."""
  s, batch, step = lr_setup
  schedule = opt_lib.learning_rate_schedule(s.config.train)
  poisoned = dict(batch, loss_mask=np.where(np.arange(batch["loss_mask"].size).reshape(
      batch["loss_mask"].shape) == 3, np.nan, batch["loss_mask"]).astype(np.float32))
  with jax.set_mesh(s.mesh):
    state = setup_lib.init_state(s)
    state, m1 = step(state, steps_lib.global_batch(s, poisoned))
    assert bool(m1["nonfinite"])
    before = _bias(state)
    state, m2 = step(state, steps_lib.global_batch(s, batch))
  assert int(state["step"]) == 2
  assert float(m2["lr"]) == pytest.approx(float(schedule(0)), rel=1e-6)
  assert float(schedule(1)) < 0.9 * float(schedule(0))          # the old log would differ
  assert abs(_bias(state) - before) == pytest.approx(float(m2["lr"]), rel=1e-3)


def test_logged_lr_after_an_import_at_a_later_step(lr_setup):
  """An import at --step=N writes step N with a fresh optimizer (count 0): the first update
  applies schedule(0), and that is what is logged (not schedule(N))."""
  s, batch, step = lr_setup
  schedule = opt_lib.learning_rate_schedule(s.config.train)
  with jax.set_mesh(s.mesh):
    state = setup_lib.init_state(s)
    state["step"] = jax.device_put(jnp.asarray(3, jnp.int32), s.state_shardings["step"])
    before = _bias(state)
    state, m = step(state, steps_lib.global_batch(s, batch))
  assert float(m["lr"]) == pytest.approx(float(schedule(0)), rel=1e-6)
  assert float(schedule(3)) < 0.5 * float(schedule(0))
  assert abs(_bias(state) - before) == pytest.approx(float(m["lr"]), rel=1e-3)
