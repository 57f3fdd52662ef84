"""Prepared rows: preparation (every source kind, deterministic, atomic), the global row shuffle
(independent batch rows, exact resume, process shares, another process count), the fixed
validation sample, and the errors for data that does not match the run."""

import json
import os

import grain
import numpy as np
import pytest

from configs.default import get_config
from polycom_jax import data
from polycom_jax.config_errors import ConfigError
from polycom_jax.data import pipeline, prepared

SEQ_LEN = 32
TOK = data.ByteTokenizer()


def _config(tmp_path, **overrides):
  c = get_config().data
  c.update(seq_len=SEQ_LEN, data_dir=str(tmp_path / "data_cache"), prefetch=0, prepared=True,
           prepare_workers=1)
  c.update(overrides)
  return c


def _long_documents(root, n=4, length=20000):
  """n long documents, document k made only of the letter 'a' + k: a row tells its document."""
  root.mkdir(exist_ok=True)
  for k in range(n):
    (root / f"doc{k}.txt").write_text(chr(ord("a") + k) * length)
  (root / "short.txt").write_text("a short one\n")
  return str(root / "*.txt")


def _document_of(row_inputs: np.ndarray) -> int:
  letters = row_inputs[(row_inputs >= ord("a")) & (row_inputs < ord("a") + 26)]
  return int(np.bincount(letters - ord("a")).argmax())


def _dominance(it, batches: int) -> float:
  """Mean over batches of the largest share of a batch's rows that come from one document."""
  shares = []
  for _ in range(batches):
    docs = [_document_of(r) for r in next(it)["inputs"]]
    shares.append(max(np.bincount(docs)) / len(docs))
  return float(np.mean(shares))


def test_batch_rows_are_independent_of_their_neighbours(tmp_path):
  """4 documents of 625 rows each: packed in order (the old pipeline), a batch of 8 is one
  document; from a global row shuffle (prepared, or a shuffle window on the fly) a batch's most
  common document holds about 3-4 of its 8 rows, as for i.i.d. draws (expected share 0.47)."""
  glob_ = _long_documents(tmp_path / "docs")
  in_order = data.make_train_iterator(
      _config(tmp_path, text_glob=glob_, prepared=False, shuffle_buffer_rows=0), TOK,
      batch_size=8, seed=0)
  window = data.make_train_iterator(
      _config(tmp_path, text_glob=glob_, prepared=False, shuffle_buffer_rows=4096), TOK,
      batch_size=8, seed=0)
  rows = data.make_train_iterator(_config(tmp_path, text_glob=glob_), TOK, batch_size=8, seed=0)
  assert _dominance(in_order, 40) > 0.9
  assert _dominance(window, 40) < 0.65
  assert _dominance(rows, 40) < 0.65
  for it in (in_order, window, rows):
    it.close()


def _ids(n: int, seed: int, b: int, p: int, count: int, steps: int) -> list[list[int]]:
  """The row indices process p of `count` reads, `steps` batches of b (the index logic alone)."""
  ds = pipeline._ProcessShare(grain.MapDataset.range(n).shuffle(seed=seed), per_process=b,
                              process_index=p, process_count=count).batch(b)
  return [ds[k].tolist() for k in range(steps)]


def test_processes_read_disjoint_rows_that_cover_each_epoch():
  n, b = 48, 4                                        # 6 global batches of 8 per epoch
  shares = [_ids(n, 3, b, p, 2, 12) for p in range(2)]
  single = _ids(n, 3, 2 * b, 0, 1, 12)
  for k in range(12):
    assert shares[0][k] + shares[1][k] == single[k]    # process p holds slice p of batch k
  first, second = sum(single[:6], []), sum(single[6:], [])
  assert sorted(first) == sorted(second) == list(range(n))     # each epoch: every row once
  assert first != second                                          # reshuffled every epoch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = "the quick brown fox jumps over a lazy dog packing rows of tokens".split()
  for i in range(20):
    text = " ".join(rng.choice(words, int(rng.integers(5, 25)))) + f" {i}\n"
    (root / f"d{i:02d}.txt").write_text(text)
  return str(root / "*.txt")


def _batches(c, n, state=None, **kw):
  it = data.make_train_iterator(c, TOK, seed=0, **kw)
  if state is not None:
    it.set_state(json.loads(json.dumps(state)))
  out = [next(it) for _ in range(n)]
  st = it.get_state()
  it.close()
  return out, st


@pytest.mark.parametrize("k", [3, 17], ids=["mid_epoch", "past_an_epoch_boundary"])
def test_exact_resume(tmp_path, corpus, k):
  c = _config(tmp_path, text_glob=corpus)
  rows = len(prepared.open_rows(c, TOK, "train"))
  assert 4 * 3 < rows < 4 * 17                       # k=17 is in the second epoch or later
  reference, _ = _batches(c, k + 5, batch_size=4)
  _, state = _batches(c, k, batch_size=4)
  resumed, _ = _batches(c, 5, state=state, batch_size=4)
  for a, b in zip(reference[k:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_restore_onto_another_process_count(tmp_path, corpus):
  """The state is the global step: two processes' position restores onto one process (and
  back), each reading its slice of the same global batches."""
  c = _config(tmp_path, text_glob=corpus)
  parts = [_batches(c, 3, batch_size=2, process_index=p, process_count=2) for p in range(2)]
  assert parts[0][1] == parts[1][1]
  nxt = [_batches(c, 1, state=parts[0][1], batch_size=2, process_index=p, process_count=2)[0][0]
         for p in range(2)]
  one, _ = _batches(c, 1, state=parts[0][1], batch_size=4)
  for key in one[0]:
    np.testing.assert_array_equal(one[0][key], np.concatenate([nxt[0][key], nxt[1][key]]))


def test_rows_have_the_packers_format(tmp_path, corpus):
  c = _config(tmp_path, text_glob=corpus)
  batch = _batches(c, 1, batch_size=4)[0][0]
  assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
  for inputs, targets, seg, pos in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                       batch["positions"]):
    new = np.r_[True, seg[1:] != seg[:-1]]
    np.testing.assert_array_equal(seg, np.cumsum(new))
    assert np.all(inputs[1:][new[1:]] == TOK.eos_id)          # a piece starts at an EOS
    np.testing.assert_array_equal(pos, np.arange(SEQ_LEN) - np.maximum.accumulate(
        np.where(new, np.arange(SEQ_LEN), 0)))
  assert np.all(batch["loss_mask"] == 1.0)


def _stream(texts) -> np.ndarray:
  return np.concatenate([[TOK.eos_id] + TOK.encode(t) for t in texts]).astype(np.int32)


def _check_rows_match(rows: prepared.PreparedRows, texts):
  """Row r holds stream tokens [r*T, r*T + T]: the rows tile the token stream in order."""
  stream = _stream(texts)
  n = len(rows)
  assert n == (len(stream) - 1) // SEQ_LEN
  inputs = np.concatenate([rows[i]["inputs"] for i in range(n)])
  np.testing.assert_array_equal(inputs, stream[:n * SEQ_LEN])
  np.testing.assert_array_equal(rows[n - 1]["targets"], stream[(n - 1) * SEQ_LEN + 1:
                                                              n * SEQ_LEN + 1])


def _texts(n, offset=0):
  return [f"record {i + offset}: " + "wörds and more words " * (i % 7 + 1) for i in range(n)]


def test_jsonl_source(tmp_path):
  (tmp_path / "train").mkdir()
  train, val = _texts(30), _texts(6, 100)
  with open(tmp_path / "train" / "a.jsonl", "w") as f:
    for t in train:
      f.write(json.dumps({"content": t, "other": 1}) + "\n")
  with open(tmp_path / "val.jsonl", "w") as f:
    for t in val:
      f.write(json.dumps({"content": t}) + "\n")
  c = _config(tmp_path, train_files=str(tmp_path / "train" / "*.jsonl"),
              eval_files=str(tmp_path / "val.jsonl"), text_feature="content")
  data.check_data_config(c)
  _check_rows_match(prepared.open_rows(c, TOK, "train"), train)
  _check_rows_match(prepared.open_rows(c, TOK, "eval"), val)


def test_parquet_source(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  train = _texts(40)
  pq.write_table(pa.table({"text": train[:25]}), tmp_path / "part0.parquet")
  pq.write_table(pa.table({"text": train[25:]}), tmp_path / "part1.parquet")
  pq.write_table(pa.table({"text": _texts(5, 50)}), tmp_path / "val.parquet.x")
  os.rename(tmp_path / "val.parquet.x", tmp_path / "val.parquet")
  c = _config(tmp_path, train_files=str(tmp_path / "part*.parquet"),
              eval_files=str(tmp_path / "val.parquet"))
  _check_rows_match(prepared.open_rows(c, TOK, "train"), train)


def test_builtin_corpus_source_reproduces_its_documents(tmp_path, corpus):
  """The built-in corpus (a TFDS dataset in array_record format, read through its data
  source, as any other prepared TFDS dataset is)."""
  c = _config(tmp_path, text_glob=corpus)
  source = data.get_data_source(c, c.train_split)
  texts = [source[i]["text"].decode() for i in range(len(source))]
  _check_rows_match(prepared.open_rows(c, TOK, "train"), texts)


def test_preparation_is_deterministic_reused_and_atomic(tmp_path, corpus):
  one = _config(tmp_path, text_glob=corpus, prepared_dir=str(tmp_path / "one"))
  two = _config(tmp_path, text_glob=corpus, prepared_dir=str(tmp_path / "two"))
  a = prepared.prepare(one, TOK, "train", workers=1)
  # A killed preparation left a temporary folder: it is replaced, never read.
  stale = prepared.directory(two, TOK, "train")[0] + ".tmp-12345"
  os.makedirs(stale)
  (open(os.path.join(stale, "rows-00000.array_record"), "w")).write("junk")
  b = prepared.prepare(two, TOK, "train", workers=2)
  assert not os.path.exists(stale)
  ma, mb = prepared.read_manifest(a), prepared.read_manifest(b)
  assert {k: v for k, v in ma.items() if k not in ("seconds", "workers")} == {
      k: v for k, v in mb.items() if k not in ("seconds", "workers")}
  for shard in ma["shards"]:
    with open(os.path.join(a, shard), "rb") as fa, open(os.path.join(b, shard), "rb") as fb:
      assert fa.read() == fb.read()
  mtime = os.path.getmtime(os.path.join(a, "manifest.json"))
  assert prepared.prepare(one, TOK, "train") == a                     # reused, not rewritten
  assert os.path.getmtime(os.path.join(a, "manifest.json")) == mtime


def test_a_prepared_folder_that_does_not_match_is_refused(tmp_path, corpus):
  c = _config(tmp_path, text_glob=corpus)
  path = prepared.prepare(c, TOK, "train")
  other = _config(tmp_path, text_glob=corpus, seq_len=64, prepared_train=path)
  with pytest.raises(ConfigError, match=r"config.data.seq_len=32, but this run has 64"):
    prepared.open_rows(other, TOK, "train")
  for name, file, content, message in (
      ("unfinished", "rows-00000.array_record", "x", "unfinished preparation"),
      ("broken", "manifest.json", "{not json", "not valid JSON")):
    folder = tmp_path / name
    folder.mkdir()
    (folder / file).write_text(content)
    with pytest.raises(ConfigError, match=message):
      prepared.open_rows(_config(tmp_path, text_glob=corpus, prepared_train=str(folder)),
                         TOK, "train")
  with pytest.raises(ConfigError, match=r"config.data.prepared_train=s3://b/rows: only local"):
    prepared.open_rows(_config(tmp_path, text_glob=corpus, prepared_train="s3://b/rows"), TOK,
                       "train")


def test_validation_is_a_fixed_sample_from_across_the_split(tmp_path, corpus):
  sample = pipeline.eval_sample(1000, 8, 4)
  assert len(sample) == 32 and len(set(sample)) == 32
  assert sample.min() < 100 and sample.max() > 900                 # not the first rows only
  np.testing.assert_array_equal(sample, pipeline.eval_sample(1000, 8, 4))
  everything = pipeline.eval_sample(13, 8, 0)
  assert everything.tolist() == list(range(13)) + [-1] * 3          # padded to whole batches
  c = _config(tmp_path, text_glob=corpus)

  def read():
    it = data.make_eval_iterator(c, TOK, batch_size=4, max_batches=2)
    out = list(it)
    it.close()
    return out
  first, again = read(), read()
  rows = len(prepared.open_rows(c, TOK, "eval"))
  assert len(first) == len(pipeline.eval_sample(rows, 4, 2)) // 4 >= 1
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_resume_with_changed_data_settings_names_the_field():
  saved = {"text_glob": "a/*.txt", "seq_len": 128, "prepared": True, "num_workers": 0}
  data.check_resumable(saved, dict(saved, num_workers=2), step=30)   # prepared: no matter
  with pytest.raises(ConfigError, match=r"config.data.text_glob is 'b/\*.txt' but the step-30 "
                                        r"checkpoint was trained with 'a/\*.txt'"):
    data.check_resumable(saved, dict(saved, text_glob="b/*.txt"), step=30)
  on_the_fly = dict(saved, prepared=False)
  with pytest.raises(ConfigError, match="config.data.num_workers"):
    data.check_resumable(on_the_fly, dict(on_the_fly, num_workers=2), step=30)


def test_an_unwritable_prepared_dir_is_a_config_error(tmp_path, corpus):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  c = _config(tmp_path, text_glob=corpus, prepared_dir=str(blocker / "prepared"))
  with pytest.raises(ConfigError, match="config.data.prepared_dir: cannot write the prepared"):
    prepared.prepare(c, TOK, "train")
