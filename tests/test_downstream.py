"""Zero-shot multiple-choice evaluation: scoring against an unbatched reference, accuracy on a
forced task, TFDS loaders on mock data, the JSONL loader, and eval.py --tasks end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from polycom_jax import checkpoint as ckpt_lib
from polycom_jax import setup as setup_lib
from polycom_jax.config_errors import ConfigError
from polycom_jax.downstream import scoring, tasks
from polycom_jax.downstream.tasks import MultipleChoice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = "bcdefghijklmnopqrstuvwxyz"


def _setup(tiny, document_mask: bool) -> setup_lib.Setup:
  """The tiny model, scoring batches of 2 rows."""
  config = tiny()
  config.model.document_mask = document_mask
  config.eval.batch_size = 2
  return setup_lib.setup(config)


@pytest.fixture(scope="module")
def packed(corpus_glob, data_dir):
  """(setup, initial params) of a tiny model with document masking: requests share rows."""
  from conftest import tiny_config
  s = _setup(lambda: tiny_config(corpus_glob, data_dir), document_mask=True)
  return s, setup_lib.init_state(s)["params"]


def _reference_logprobs(s, params, examples) -> list[float]:
  """The model called on each request alone, unpadded: sum of log-softmax at continuation
  targets (float64), after keeping the last seq_len + 1 tokens."""
  tok, seq_len = s.tokenizer, s.config.data.seq_len
  forward = jax.jit(lambda p, tokens: nnx.merge(s.graphdef, p)(tokens))
  out = []
  for context, continuation in (r for ex in examples for r in ex.requests()):
    continuation_ids = tok.encode(continuation)
    tokens = np.asarray([tok.eos_id] + tok.encode(context) + continuation_ids)[-(seq_len + 1):]
    logits = np.asarray(forward(params, tokens[None, :-1].astype(np.int32))[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))     # [n, V]
    n = min(len(continuation_ids), len(tokens) - 1)
    positions = np.arange(len(tokens) - 1 - n, len(tokens) - 1)
    out.append(float(logp[positions, tokens[positions + 1]].sum()))
  return out


# Requests of few distinct lengths (each length compiles the reference once).
EXAMPLES = [
    MultipleChoice("Question: 2+2?\nAnswer:", ("4", "four", "22"), 0),   # different lengths
    # Longer than seq_len (32): the context is cut from the left.
    MultipleChoice("A context that is much longer than the others, and than a row. Then",
                   ("yes", "it ends here."), 1),
    MultipleChoice(("The cat", "The dog"), ("sat.", "sat."), 0),
    MultipleChoice("", ("empty", "!?!?!"), 1, target_delimiter=""),
]


def test_batched_scores_equal_the_unbatched_model(packed, tiny):
  """Packed rows (document masking) and one request per row (no masking) both give the
  log-likelihoods of the model called on each request alone."""
  s, params = packed
  expected = _reference_logprobs(s, params, EXAMPLES)
  unpacked = _setup(tiny, document_mask=False)   # the same params fit, the graph differs
  for setup in (s, unpacked):
    logprobs, truncated = scoring.score_examples(setup, scoring.make_score_step(setup), params,
                                                 EXAMPLES)
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-4)
    assert truncated == 2
  requests = [scoring.make_request(s.tokenizer, c, x, 32) for ex in EXAMPLES
              for c, x in ex.requests()]
  for share_rows in (True, False):
    rows, _ = scoring.pack(requests, 32, s.tokenizer.pad_id, share_rows, 2)
    used_rows = int((rows["segment_ids"].max(axis=1) > 0).sum())
    assert (used_rows < len(requests)) == share_rows
    assert len(rows["inputs"]) % 2 == 0 and len(rows["inputs"]) > 2   # several batches


def test_context_whitespace_moves_to_the_continuation(packed):
  s, _ = packed
  assert scoring.encode_pair(s.tokenizer, "Answer: ", "yes") == (list(b"Answer:"), list(b" yes"))
  request = scoring.make_request(s.tokenizer, "Answer: ", "yes", 32)
  assert request.inputs.tolist() == [s.tokenizer.eos_id] + list(b"Answer: ye")
  assert request.num_scored == 4 and not request.truncated


def test_one_compiled_step_for_every_task(packed):
  s, params = packed
  step = scoring.make_score_step(s)
  scoring.score_examples(s, step, params, EXAMPLES)
  scoring.score_examples(s, step, params, EXAMPLES[:2] * 7)
  assert step._cache_size() == 1


def _forced_params(params, favoured: int):
  """Blocks add nothing (output projections zero), every token embeds the same, and the head
  gives `favoured` logit d_model and the rest 0: the model always predicts that token."""
  def set_leaf(path, x):
    key = jax.tree_util.keystr(path)
    if "'wo'" in key or "'w_down'" in key:
      return jnp.zeros_like(x)
    if key.startswith("['embed']"):
      return jnp.ones_like(x)
    if key.startswith("['lm_head']"):
      return jnp.zeros_like(x).at[:, favoured].set(1.0)
    return x
  return jax.tree_util.tree_map_with_path(set_leaf, params)


def _forced_task(rng, n: int) -> list[MultipleChoice]:
  """Gold is the run of 'a's; distractors of other letters, lengths differing from it."""
  examples = []
  for _ in range(n):
    choices = ["".join(rng.choice(list(LETTERS), rng.integers(1, 9))) for _ in range(3)]
    gold = int(rng.integers(4))
    choices.insert(gold, "a" * int(rng.integers(1, 9)))
    context = "".join(rng.choice(list(LETTERS + " "), rng.integers(1, 40))) + ":"
    examples.append(MultipleChoice(context, tuple(choices), gold))
  return examples


def test_forced_task_is_solved_and_shuffled_labels_give_chance(packed):
  s, params = packed
  params = _forced_params(params, favoured=ord("a"))
  rng = np.random.default_rng(0)
  examples = _forced_task(rng, 200)
  shuffled = [MultipleChoice(e.context, e.choices, int(rng.integers(4))) for e in examples]
  results = scoring.evaluate_tasks(s, params, [tasks.TaskData("forced", examples, "test"),
                                               tasks.TaskData("shuffled", shuffled, "test")])
  forced, chance = results["forced"], results["shuffled"]
  assert forced["acc"] == forced["acc_norm"] == 1.0 and forced["n"] == 200
  assert abs(chance["acc"] - 0.25) < 0.1 and abs(chance["acc_norm"] - 0.25) < 0.1
  assert chance["acc_stderr"] == pytest.approx(
      np.sqrt(chance["acc"] * (1 - chance["acc"]) / 199))


def test_acc_norm_divides_by_characters_like_the_harness_or_by_bytes():
  """Choice "é" (1 character, 2 UTF-8 bytes) at log-likelihood -1.5 against "ab" (2 of each)
  at -2.5: per character -1.5 vs -1.25 picks "ab" (lm-evaluation-harness's decision); per
  byte -0.75 vs -1.25 picks "é"."""
  ex = tasks.MultipleChoice("Q:", ("\u00e9", "ab"), gold=0)
  logprobs = np.array([-1.5, -2.5])
  assert scoring.accuracy([ex], logprobs)["acc_norm"] == 0.0
  assert scoring.accuracy([ex], logprobs, per="bytes")["acc_norm"] == 1.0
  assert scoring.accuracy([ex], logprobs)["acc"] == 1.0
  with pytest.raises(ConfigError, match="config.eval.acc_norm_per"):
    scoring.accuracy([ex], logprobs, per="tokens")


def test_start_token_eos_or_none(tiny):
  """"eos" puts EOS before the context (as training documents); "none" scores the context alone
  (the first context byte is then not predicted); EOS still starts an empty context."""
  tok = setup_lib.setup(tiny()).tokenizer
  eos = scoring.make_request(tok, "ab", " c", 32, "eos")
  none = scoring.make_request(tok, "ab", " c", 32, "none")
  assert list(eos.inputs) == [tok.eos_id, *b"ab "] and list(none.inputs) == [*b"ab "]
  assert list(eos.targets[-2:]) == list(none.targets[-2:]) == [*b" c"]
  assert list(scoring.make_request(tok, "", "c", 32, "none").inputs) == [tok.eos_id]
  config = tiny()
  config.eval.start_token = "bos"
  with pytest.raises(ConfigError, match="config.eval.start_token"):
    scoring.check_eval_config(config)


def test_results_file_and_table(packed, tmp_path):
  results = {"arc_easy": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.6, "acc_norm_stderr": 0.1,
                          "n": 26, "skipped": 1, "truncated_requests": 0, "source": "x"}}
  path = scoring.write_results(str(tmp_path), 7, results)
  assert path == str(tmp_path / "eval" / "downstream_step_7.json")
  with open(path) as f:
    assert json.load(f) == {"step": 7, "tasks": results}
  table = scoring.format_table(results)
  assert "| arc_easy | 26 | 0.5000 ± 0.1000 | 0.6000 ± 0.1000 |" in table
  assert "1 records without a usable label" in table


# ------------------------------------------------------------------------------------------------
# Task formats and loaders

# Records as an array_record data source decodes them (bytes text, lists, int labels).
RECORDS = {
    "ai2_arc": {"id": b"q1", "question": b"Which is a metal?",
                "choices": {"text": [b"wood", b"iron", b"glass"],
                            "label": [np.int64(0), np.int64(1), np.int64(2)]},
                "answerKey": 1},
    "hellaswag": {"context": b"A man is [title] sitting on a roof. he", "activity_label": b"Roof",
                  "endings": [b"starts pulling up roofing.", b"is [step] ok."], "label": 0,
                  "split_type": b"indomain", "source_id": b"x"},
    "piqa": {"id": b"p", "goal": b"Open a jar", "sol1": b"twist the lid", "sol2": b"eat it",
             "label": 0},
    "winogrande": {"sentence": b"Sarah gave Maria a book because _ was leaving.",
                   "option1": b"Sarah", "option2": b"Maria", "label": 1},
}
EXPECTED = {
    "arc_easy": MultipleChoice("Question: Which is a metal?\nAnswer:", ("wood", "iron", "glass"),
                               1),
    "hellaswag": MultipleChoice("Roof: A man is. sitting on a roof. he",
                                ("starts pulling up roofing.", "is ok."), 0),
    "piqa": MultipleChoice("Question: Open a jar\nAnswer:", ("twist the lid", "eat it"), 0),
    "winogrande": MultipleChoice(("Sarah gave Maria a book because Sarah",
                                  "Sarah gave Maria a book because Maria"),
                                 ("was leaving.", "was leaving."), 1),
}


def _mock_source(builder, split, **kwargs):
  del kwargs
  assert split == "test" if builder.name == "ai2_arc" else split == "validation"
  return [RECORDS[builder.name], {**RECORDS[builder.name]}]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tfds_tasks_on_mock_data_source(name, tmp_path):
  with tfds.testing.mock_data(as_data_source_fn=_mock_source):
    (loaded,) = tasks.load_tasks(name, str(tmp_path), limit=0)
  assert loaded.examples == [EXPECTED[name]] * 2 and loaded.skipped == 0
  assert loaded.source.startswith("tfds:")


@pytest.mark.parametrize("name", ["arc_challenge", "hellaswag", "piqa", "winogrande"])
def test_tfds_tasks_on_random_mock_data(name, tmp_path):
  """tfds' own random examples (from the builders' features): every record is formatted or
  counted as skipped (random ARC labels miss the answer key, random sentences have no blank)."""
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    try:
      (loaded,) = tasks.load_tasks(name, str(tmp_path))
      assert len(loaded.examples) + loaded.skipped == 6
    except ConfigError as e:
      assert "no usable examples" in str(e) and "(6 skipped)" in str(e)


def test_tasks_limit_keeps_the_first_examples(tmp_path):
  with tfds.testing.mock_data(as_data_source_fn=_mock_source):
    (loaded,) = tasks.load_tasks("piqa", str(tmp_path), limit=1)
  assert len(loaded.examples) == 1


def test_unprepared_tfds_task_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ConfigError, match=r"not prepared.*tfds build ai2_arc/ARC-Easy "
                                        r".*--file_format=array_record"):
    tasks.load_tasks("arc_easy", str(tmp_path))


@pytest.mark.parametrize("spec, message", [
    ("arc_esay", "unknown task 'arc_esay'"),
    ("sciq", "sciq=PATH"),
    ("piqa,piqa", "given twice"),
    ("x=", "needs both a name and a path"),
    ("", "empty"),
])
def test_bad_task_specs(spec, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    tasks.load_tasks(spec, str(tmp_path))


def _write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_jsonl_tasks(tmp_path):
  plain = _write_lines(tmp_path / "capitals.jsonl", [
      json.dumps({"context": "Capital of France:", "choices": ["Paris", "Rome"], "gold": 0}),
      "",
      json.dumps({"context": ["A", "B"], "choices": ["x", "x"], "gold": 1,
                  "target_delimiter": ""}),
  ])
  sciq = _write_lines(tmp_path / "sciq.jsonl", [json.dumps(
      {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
       "distractor3": "neon", "correct_answer": "carbon dioxide", "support": "  Plants use CO2."})])
  loaded = tasks.load_tasks(f"jsonl:{plain},mine={plain},sciq={sciq}", str(tmp_path))
  assert [t.name for t in loaded] == ["capitals", "mine", "sciq"]
  assert loaded[0].examples == [MultipleChoice("Capital of France:", ("Paris", "Rome"), 0),
                                MultipleChoice(("A", "B"), ("x", "x"), 1, "")]
  assert loaded[0].examples[0].requests() == [("Capital of France:", " Paris"),
                                              ("Capital of France:", " Rome")]
  assert loaded[2].examples == [MultipleChoice(
      "Plants use CO2.\nQuestion: What gas do plants absorb?\nAnswer:",
      ("oxygen", "helium", "neon", "carbon dioxide"), 3)]


@pytest.mark.parametrize("line, message", [
    ('{"context": "c", "choices": ["a", "b"], "gold": 0', "not valid JSON"),
    ('["c", ["a", "b"], 0]', "expected a JSON object"),
    ('{"context": "c", "choices": ["a", "b"]}', r"missing field\(s\) \['gold'\]"),
    ('{"context": "c", "choices": ["a", "b"], "gold": 2}', "gold=2 is not an index"),
    ('{"context": "c", "choices": ["a", "b"], "gold": true}', "gold must be an integer"),
    ('{"context": "c", "choices": "ab", "gold": 0}', "choices must be a list"),
    ('{"context": "c", "choices": ["a", 3], "gold": 0}', "at least two strings"),
    ('{"context": ["c"], "choices": ["a", "b"], "gold": 0}', "one string per choice"),
    ('{"context": 5, "choices": ["a", "b"], "gold": 0}', "context must be a string"),
])
def test_jsonl_loader_rejects_malformed_lines_with_their_number(line, message, tmp_path):
  good = json.dumps({"context": "c", "choices": ["a", "b"], "gold": 0})
  path = _write_lines(tmp_path / "t.jsonl", [good, "", line, good])
  with pytest.raises(ConfigError, match=rf"t\.jsonl:3: .*{message}"):
    tasks.load_tasks(f"jsonl:{path}", str(tmp_path))


def test_raw_records_of_a_builtin_task_name_the_missing_field(tmp_path):
  path = _write_lines(tmp_path / "s.jsonl", [json.dumps({"question": "q"})])
  with pytest.raises(ConfigError, match=r"s\.jsonl:1: missing field 'distractor1'"):
    tasks.load_tasks(f"sciq={path}", str(tmp_path))


# ------------------------------------------------------------------------------------------------
# eval.py

def test_eval_cli_writes_downstream_results(tiny, corpus_glob, data_dir, tmp_path):
  config = tiny()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "run"), async_save=False)
  checkpointer.save(2, setup_lib.init_state(setup_lib.setup(config)), None,
                    setup_lib.config_as_dict(config))
  checkpointer.close()
  task = _write_lines(tmp_path / "toy.jsonl", [json.dumps(
      {"context": f"{i} + {i} =", "choices": [str(2 * i), str(2 * i + 1)], "gold": 0})
      for i in range(12)])
  common = [sys.executable, "eval.py", "--config=configs/tiny.py", f"--workdir={tmp_path}/run",
            f"--config.data.text_glob={corpus_glob}", f"--config.data.data_dir={data_dir}"]
  proc = subprocess.run(common + [f"--tasks=jsonl:{task}", "--tasks_limit=10"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "| toy | 10 |" in proc.stdout
  with open(tmp_path / "run" / "eval" / "downstream_step_2.json") as f:
    written = json.load(f)
  assert written["step"] == 2 and written["tasks"]["toy"]["n"] == 10
  proc = subprocess.run(common + ["--tasks=arc_easy", f"--tasks_data_dir={tmp_path}/empty"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "tfds build ai2_arc/ARC-Easy" in proc.stderr
  assert "Traceback" not in proc.stderr
