"""Tests of polycom_jax.data: tokenizers, the built-in corpus, sources, packing, iterator state."""

import json
import os
import random
import threading

from absl import flags
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
import tokenizers as hf

from configs.default import get_config
from polycom_jax import data
from polycom_jax.config_errors import ConfigError
from polycom_jax.data import builtin_corpus

SEQ_LEN = 16
EOS = data.ByteTokenizer.eos_id


def _write_corpus(root, num_docs=12):
  """Unique small documents of varied length (some span many rows), with non-ASCII text."""
  os.makedirs(root / "sub", exist_ok=True)
  texts = [f"doc {i}: " + "héllo wörld " * (i * i % 17) + f"end {i}\n" for i in range(num_docs)]
  for i, text in enumerate(texts):
    (root / ("sub" if i % 3 else "") / f"d{i:02d}.txt").write_text(text, encoding="utf-8")
  return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  texts = _write_corpus(root)
  return root, texts


def _config(tmp_path, corpus_root=None, **overrides):
  """The on-the-fly pipeline (prepared rows: tests/test_prepared.py), no row shuffle window
  unless asked, so batches follow the packer's order."""
  c = get_config().data
  c.seq_len = SEQ_LEN
  c.data_dir = str(tmp_path / "data_cache")
  c.prefetch = 0
  c.prepared = False
  c.shuffle_buffer_rows = 0
  if corpus_root is not None:
    c.text_glob = str(corpus_root / "**" / "*.txt")
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory):
  return _config(tmp_path_factory.mktemp("cache"), corpus[0])


def _documents(c, split, tokenizer=data.ByteTokenizer()):
  """The split's documents in source order, tokenized, each ending with EOS."""
  source = data.get_data_source(c, split)
  return [tokenizer.encode(source[i][c.text_feature].decode()) + [tokenizer.eos_id]
          for i in range(len(source))]


def _stream(batches, key):
  """Non-padding tokens of `key`, rows in order: [num_tokens]."""
  return np.concatenate([b[key][b["loss_mask"] > 0] for b in batches])


def _split_docs(targets):
  """A target stream cut after each EOS into documents (lists of ids)."""
  cuts = np.flatnonzero(targets == EOS) + 1
  return [d.tolist() for d in np.split(targets, cuts) if len(d)]


def _check_rows(batch):
  """Masks, segment ids, positions and the inputs/targets shift inside every row."""
  assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
  for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("segment_ids", np.int32), ("positions", np.int32)]:
    assert batch[key].dtype == dtype and batch[key].shape == batch["inputs"].shape
  np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
  for inputs, targets, seg, pos in zip(batch["inputs"], batch["targets"],
                                       batch["segment_ids"], batch["positions"]):
    real = seg > 0
    assert np.all(real[:real.sum()])  # padding only at the end of a row
    seg, pos, inputs, targets = seg[real], pos[real], inputs[real], targets[real]
    if not len(seg):
      continue
    new = np.r_[True, seg[1:] != seg[:-1]]
    np.testing.assert_array_equal(seg, np.cumsum(new))  # 1, 2, ... per piece
    np.testing.assert_array_equal(pos, np.arange(len(pos)) - np.maximum.accumulate(
        np.where(new, np.arange(len(pos)), 0)))  # restart at 0 in each piece
    same = ~new[1:]
    np.testing.assert_array_equal(inputs[1:][same], targets[:-1][same])
    assert np.all(inputs[1:][~same] == EOS) and np.all(targets[:-1][~same] == EOS)


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- tokenizers --------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_byte_lengths():
  tok = data.ByteTokenizer()
  text = "héllo wörld, ünïcode 🌍 ∑\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (258,) and lengths.dtype == np.int32
  assert lengths[ids].sum() == len(text.encode("utf-8"))
  assert lengths[tok.eos_id] == lengths[tok.pad_id] == 0


_WORDS = "the quick brown fox jumps over a lazy dog while packing rows of tokens".split()


def _lines(n=300):
  rng = random.Random(0)
  return [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(n)]


def test_sentencepiece_tokenizer(tmp_path):
  (tmp_path / "train.txt").write_text("\n".join(_lines()))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"),
                                 model_prefix=str(tmp_path / "sp"), vocab_size=320,
                                 byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
  c = _config(tmp_path, tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "sp.model"))
  tok = data.get_tokenizer(c)
  text = "the lazy fox packs rows, ünïcode!"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.eos_id == 2 and tok.pad_id == tok.eos_id  # this model has no pad piece
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (tok.vocab_size,) and lengths[tok.eos_id] == 0
  # SentencePiece adds one leading space ('\u2581') to a text.
  assert lengths[ids].sum() == len(text.encode("utf-8")) + 1


def _hf_tokenizer_file(tmp_path, special_tokens):
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_lines(), trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  return str(tmp_path / "tokenizer.json")


def test_huggingface_tokenizer(tmp_path):
  path = _hf_tokenizer_file(tmp_path, ["<|endoftext|>", "<pad>"])
  tok = data.get_tokenizer(_config(tmp_path, tokenizer="huggingface", tokenizer_path=path))
  text = "the lazy fox packs rows, ünïcode 🌍!"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert (tok.eos_id, tok.pad_id) == (0, 1)
  lengths = tok.token_byte_lengths()
  assert lengths[ids].sum() == len(text.encode("utf-8"))  # exact for byte-level BPE
  assert lengths[tok.eos_id] == lengths[tok.pad_id] == 0


def test_huggingface_eos_from_tokenizer_config(tmp_path):
  path = _hf_tokenizer_file(tmp_path, ["<s>", "<my_eos>"])
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_eos>"}}))
  tok = data.get_tokenizer(_config(tmp_path, tokenizer="huggingface", tokenizer_path=path))
  assert tok.eos_id == 1 and tok.pad_id == tok.eos_id


@pytest.mark.parametrize("name,path,message", [
    ("wordpiece", "", "config.data.tokenizer="),
    ("sentencepiece", "", "config.data.tokenizer_path"),
    ("sentencepiece", "missing.model", "config.data.tokenizer_path"),
    ("huggingface", "missing.json", "config.data.tokenizer_path"),
    ("sentencepiece", "garbage", "config.data.tokenizer_path"),
    ("huggingface", "garbage", "config.data.tokenizer_path"),
])
def test_tokenizer_config_errors(tmp_path, name, path, message):
  (tmp_path / "garbage").write_text("not a tokenizer")
  c = _config(tmp_path, tokenizer=name, tokenizer_path=str(tmp_path / path) if path else "")
  with pytest.raises(ConfigError, match=message):
    data.get_tokenizer(c)


# --- the built-in corpus -----------------------------------------------------------------------

def test_builtin_corpus_splits_are_disjoint_and_cover_the_files(cfg, corpus):
  data.check_data_config(cfg)
  ids = {split: [x["id"].decode() for x in data.get_data_source(cfg, split)]
         for split in ("train", "validation")}
  assert ids["validation"] and not set(ids["train"]) & set(ids["validation"])
  assert len(ids["train"]) + len(ids["validation"]) == len(corpus[1])
  assert "sub/d01.txt" in ids["train"] + ids["validation"]  # paths relative to the glob root


def test_default_stdlib_corpus(tmp_path):
  c = _config(tmp_path)
  data.check_data_config(c)
  train, validation = data.get_data_source(c, "train"), data.get_data_source(c, "validation")
  train_ids = {x["id"] for x in train}
  validation_ids = {x["id"] for x in validation}
  assert not train_ids & validation_ids
  assert 0.01 < len(validation_ids) / (len(train_ids) + len(validation_ids)) < 0.06
  dirs = {d for i in train_ids for d in i.decode().split("/")[:-1]}
  assert not dirs & {"test", "tests", "site-packages"}


def test_preparation_is_idempotent_and_safe_when_concurrent(tmp_path, corpus):
  data_dir = str(tmp_path / "cache")
  glob = str(corpus[0] / "**" / "*.txt")
  builders = [None, None]

  def prepare(i):
    builders[i] = builtin_corpus.prepare_builtin_corpus(data_dir, glob)

  threads = [threading.Thread(target=prepare, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert builders[0].data_dir == builders[1].data_dir
  files = sorted(os.listdir(builders[0].data_dir))
  mtimes = [os.path.getmtime(os.path.join(builders[0].data_dir, f)) for f in files]
  again = builtin_corpus.prepare_builtin_corpus(data_dir, glob)
  assert again.data_dir == builders[0].data_dir
  assert mtimes == [os.path.getmtime(os.path.join(again.data_dir, f)) for f in files]
  assert not [d for d in os.listdir(os.path.dirname(again.data_dir)) if "incomplete" in d]
  assert len(again.as_data_source("train")) + len(again.as_data_source("validation")) == 12


def test_different_globs_and_edited_files_do_not_collide(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _write_corpus(a, num_docs=4)
  _write_corpus(b, num_docs=6)
  glob_a, glob_b = str(a / "**" / "*.txt"), str(b / "**" / "*.txt")
  name_a = builtin_corpus.corpus_config(glob_a).name
  assert name_a != builtin_corpus.corpus_config(glob_b).name
  for root, n in ((a, 4), (b, 6)):
    c = _config(tmp_path, root)
    assert sum(len(data.get_data_source(c, s)) for s in ("train", "validation")) == n
  (a / "d00.txt").write_text("edited")
  assert builtin_corpus.corpus_config(glob_a).name != name_a


# --- packing and iterators ---------------------------------------------------------------------

def test_eval_packing_reproduces_the_documents(cfg):
  docs = _documents(cfg, "train")
  c = cfg.copy_and_resolve_references()
  c.eval_split = "train"
  batches = list(data.make_eval_iterator(c, data.ByteTokenizer(), batch_size=3))
  for batch in batches:
    _check_rows(batch)
  targets, inputs = _stream(batches, "targets"), _stream(batches, "inputs")
  assert targets.tolist() == sum(docs, [])  # in order, no token lost or repeated
  assert inputs[0] == EOS and inputs[1:].tolist() == targets[:-1].tolist()
  num_rows = -(-len(targets) // SEQ_LEN)
  assert len(batches) == -(-num_rows // 3)
  assert batches[-1]["loss_mask"][-1].sum() == 0 or num_rows % 3 == 0
  assert len(list(data.make_eval_iterator(c, data.ByteTokenizer(), batch_size=3,
                                          max_batches=2))) == 2


def test_train_epochs_cover_the_documents_and_reshuffle(cfg):
  docs = _documents(cfg, "train")
  total = sum(len(d) for d in docs)
  it = data.make_train_iterator(cfg, data.ByteTokenizer(), batch_size=4, seed=3)
  batches = [next(it) for _ in range(-(-2 * total // (4 * SEQ_LEN)) + 1)]
  for batch in batches:
    _check_rows(batch)
    assert batch["loss_mask"].all()  # training rows are full
  targets, inputs = _stream(batches, "targets"), _stream(batches, "inputs")
  assert inputs[1:].tolist() == targets[:-1].tolist()  # rows continue each other
  epoch1, epoch2 = _split_docs(targets[:total]), _split_docs(targets[total:2 * total])
  assert sorted(epoch1) == sorted(docs) == sorted(epoch2)
  assert epoch1 != epoch2 and epoch1 != docs


@pytest.mark.parametrize("k", [0, 1, 5, 40])
def test_train_iterator_state_round_trips_through_json(cfg, k):
  c = cfg.copy_and_resolve_references()
  c.prefetch = 2  # the default in-process path: a prefetch thread
  it = data.make_train_iterator(c, data.ByteTokenizer(), batch_size=3, seed=1)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]
  restored = data.make_train_iterator(c, data.ByteTokenizer(), batch_size=3, seed=1)
  restored.set_state(state)
  _assert_batches_equal([next(restored) for _ in range(6)], expected)
  it.close()
  restored.close()


def test_process_shards_are_disjoint_and_cover_the_data(cfg):
  c = cfg.copy_and_resolve_references()
  c.eval_split = "train"
  shards = [list(data.make_eval_iterator(c, data.ByteTokenizer(), batch_size=2,
                                         process_index=i, process_count=2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1])  # every process runs the same number of eval steps
  docs = [_split_docs(_stream(batches, "targets")) for batches in shards]
  assert not {tuple(d) for d in docs[0]} & {tuple(d) for d in docs[1]}
  assert sorted(docs[0] + docs[1]) == sorted(_documents(c, "train"))
  it = data.make_train_iterator(c, data.ByteTokenizer(), batch_size=2, seed=0, process_index=1,
                                process_count=2)
  seen = _split_docs(_stream([next(it) for _ in range(20)], "targets"))[:-1]
  assert {tuple(d) for d in seen} <= {tuple(d) for d in docs[1]}


def test_the_eval_batch_count_of_several_processes_is_tokenized_once(cfg, monkeypatch):
  """The count tokenizes every process's shard; the training loop evaluates many times, so the
  second evaluation of a run reads only its own shard."""
  from polycom_jax.data import pipeline
  reads = []
  shard = pipeline._process_shard
  monkeypatch.setattr(pipeline, "_process_shard", lambda *a: reads.append(a[2]) or shard(*a))
  first = list(data.make_eval_iterator(cfg, data.ByteTokenizer(), batch_size=2,
                                       process_index=1, process_count=3))
  assert sorted(reads) == [0, 1, 1, 2]          # the count reads every shard, then its own
  tokenizer, reads[:] = data.ByteTokenizer(), []
  for _ in range(2):
    again = list(data.make_eval_iterator(cfg, tokenizer, batch_size=2, process_index=1,
                                         process_count=3))
  assert reads == [1, 0, 1, 2, 1]               # a new tokenizer counts once more, then never
  _assert_batches_equal(again, first)


def test_more_processes_than_documents(cfg):
  """Eval shards may be empty (all-padding batches keep the step counts equal); train may not."""
  num_docs = len(data.get_data_source(cfg, "validation"))
  counts = []
  for i in range(num_docs + 1):
    batches = list(data.make_eval_iterator(cfg, data.ByteTokenizer(), batch_size=2,
                                           process_index=i, process_count=num_docs + 1))
    counts.append(len(batches))
    assert (sum(b["loss_mask"].sum() for b in batches) == 0) == (i == num_docs)
  assert len(set(counts)) == 1 and counts[0] > 0
  with pytest.raises(ConfigError, match="config.data.train_split"):
    data.make_train_iterator(cfg, data.ByteTokenizer(), batch_size=2, seed=0, process_index=99,
                             process_count=100)


def test_multiprocess_workers_round_trip(cfg):
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  c = cfg.copy_and_resolve_references()
  c.num_workers = 1
  it = data.make_train_iterator(c, data.ByteTokenizer(), batch_size=2, seed=0)
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  it.close()
  restored = data.make_train_iterator(c, data.ByteTokenizer(), batch_size=2, seed=0)
  restored.set_state(state)
  got = [next(restored) for _ in range(3)]
  restored.close()
  _assert_batches_equal(got, expected)
  c.num_workers = 0
  _assert_batches_equal(first, [b for b, _ in zip(
      data.make_train_iterator(c, data.ByteTokenizer(), batch_size=2, seed=0), range(3))])


# --- other TFDS datasets -----------------------------------------------------------------------

def test_mock_tfds_text_dataset(tmp_path):
  c = _config(tmp_path, tfds_name="lm1b", train_split="train", eval_split="test")
  os.makedirs(c.data_dir)
  with tfds.testing.mock_data(num_examples=8):
    data.check_data_config(c)
    batch = next(data.make_train_iterator(c, data.ByteTokenizer(), batch_size=2, seed=0))
  _check_rows(batch)
  assert batch["inputs"].shape == (2, SEQ_LEN)


@pytest.fixture(scope="module")
def tiny_texts_dir(tmp_path_factory):
  """A user dataset `polycom_tiny_texts` prepared elsewhere: only its files are in data_dir."""
  with tfds.core.registered.skip_registration():

    class PolycomTinyTexts(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("0.1.0")
      code_path = None  # defined in a test: no checksums file to look up

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "test": self._generate_examples(3)}

      def _generate_examples(self, n):
        for i in range(n):
          yield i, {"content": f"example {i} " * (i + 1)}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  PolycomTinyTexts(data_dir=data_dir).download_and_prepare(file_format="array_record")
  return data_dir


def test_prepared_tfds_dataset_by_name(tmp_path, tiny_texts_dir):
  c = _config(tmp_path, tfds_name="polycom_tiny_texts", data_dir=tiny_texts_dir,
              text_feature="content", eval_split="test")
  data.check_data_config(c)
  batches = list(data.make_eval_iterator(c, data.ByteTokenizer(), batch_size=2))
  assert _stream(batches, "targets").tolist() == sum(_documents(c, "test"), [])
  assert len(_documents(c, "test")) == 3


def test_prepared_rows_from_a_tfds_dataset(tmp_path, tiny_texts_dir):
  """Any TFDS dataset in array_record format prepares into rows that tile its documents."""
  from polycom_jax.data import prepared
  c = _config(tmp_path, tfds_name="polycom_tiny_texts", data_dir=tiny_texts_dir,
              text_feature="content", train_split="train", eval_split="test", prepared=True,
              prepared_dir=str(tmp_path / "prepared"), seq_len=8)
  tok = data.ByteTokenizer()
  rows = prepared.open_rows(c, tok, "train")
  stream = np.concatenate([[EOS] + d[:-1] for d in _documents(c, "train")])
  inputs = np.concatenate([rows[i]["inputs"] for i in range(len(rows))])
  assert len(rows) == (len(stream) - 1) // 8
  np.testing.assert_array_equal(inputs, stream[:len(inputs)])
  assert rows.manifest["source"]["name"] == "polycom_tiny_texts"


# --- config errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (dict(seq_len=1), "config.data.seq_len"),
    (dict(tfds_name="no_such_dataset_xyz"), "config.data.tfds_name"),
    (dict(tfds_name="mnist"), "not prepared"),
    (dict(tfds_name="polycom_tiny_texts", text_feature="content", train_split="dev"),
     r"config.data.train_split='dev'.*\['test', 'train'\]"),
    (dict(tfds_name="polycom_tiny_texts", eval_split="test"),
     r"config.data.text_feature='text'.*\['content'\]"),
    (dict(eval_split="dev"), r"config.data.eval_split='dev'.*\['train', 'validation'\]"),
    (dict(text_feature="body"), r"config.data.text_feature='body'"),
])
def test_data_config_errors(tmp_path, cfg, tiny_texts_dir, overrides, message):
  c = cfg.copy_and_resolve_references()
  if "tfds_name" in overrides:
    c.data_dir = tiny_texts_dir
  for key, value in overrides.items():
    c[key] = value
  with pytest.raises(ConfigError, match=message):
    data.check_data_config(c)


def test_missing_data_dir(tmp_path):
  c = _config(tmp_path, tfds_name="lm1b", data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(ConfigError, match="config.data.data_dir"):
    data.check_data_config(c)


def test_text_glob_errors(tmp_path):
  c = _config(tmp_path, text_glob=str(tmp_path / "nothing" / "*.txt"))
  with pytest.raises(ConfigError, match="config.data.text_glob.*matches no files"):
    data.check_data_config(c)
  (tmp_path / "empty").mkdir()
  for name in ("a.txt", "b.txt"):
    (tmp_path / "empty" / name).write_text("")
  c.text_glob = str(tmp_path / "empty" / "*.txt")
  with pytest.raises(ConfigError, match="config.data.text_glob.*no non-empty text files"):
    data.check_data_config(c)
  with pytest.raises(ConfigError, match="config.data.text_glob"):
    data.get_data_source(c, "train")


def test_binary_files_in_a_text_glob_are_skipped_and_counted(tmp_path, capsys):
  root = tmp_path / "mixed"
  root.mkdir()
  for i in range(3):
    (root / f"t{i}.txt").write_text(f"text file {i} " * 20, encoding="utf-8")
  (root / "image.txt").write_bytes(bytes(range(256)) * 4)           # NUL bytes
  (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)  # not UTF-8
  (root / "cut.txt").write_bytes(("ü" * 4095 + "é").encode("utf-8")[:8192 + 1])  # cut char
  c = _config(tmp_path, text_glob=str(root / "*.txt"))
  from polycom_jax.data import builtin_corpus
  names = sorted(rel for _, rel in builtin_corpus.list_documents(c.text_glob))
  assert names == ["cut.txt", "t0.txt", "t1.txt", "t2.txt"]
  assert "skipped 2 binary file(s)" in capsys.readouterr().err
