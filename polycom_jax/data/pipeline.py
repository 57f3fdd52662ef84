"""grain pipelines of packed rows, from prepared data (the default) or made on the fly.

Prepared (config.data.prepared, polycom_jax/data/prepared.py): the corpus is tokenized once into
rows; training reads a global shuffle of the rows, reshuffled every epoch, and global batch k is
rows [k*B, (k+1)*B) of that order, each process reading its own slice of it, so every batch row
is independent of its neighbours and the iterator state (the step) restores exactly, also onto
another number of processes. Validation reads a fixed random sample of rows drawn from across
the whole split (config.eval.max_batches batches; all rows with 0), the same at every eval.

On the fly (config.data.prepared=False, for quick experiments): TFDS source -> process shard ->
(shuffle, repeat) -> tokenize -> pack -> a shuffle window of config.data.shuffle_buffer_rows
rows -> batch; validation is the split's first batches in order.

Every batch is a dict of numpy arrays, each [batch_size, seq_len]:
  inputs      int32    token ids; a document is fed as [EOS, t1..tn] (EOS also marks its start)
  targets     int32    the next token: [t1..tn, EOS] (so targets[:, i] == inputs[:, i + 1]
                       inside a row); every document token and its final EOS is a target once
  loss_mask   float32  1 for real tokens, 0 for padding
  segment_ids int32    1, 2, ... per document piece in the row, 0 for padding (attention mask)
  positions   int32    position within the document piece in this row (restarts at 0 in
                       each row), so always < seq_len
batch_size is per process: each process reads only its `[process_index::process_count]`
share of the documents. Iterator states are small JSON-serialisable dicts that restore exactly.
"""

import functools
import math
import multiprocessing
import os
import sys
import threading

import grain
import numpy as np

from polycom_jax.config_errors import ConfigError
from polycom_jax.data import packing, prepared
from polycom_jax.data.sources import check_data_config  # pylint: disable=unused-import  (re-export)
from polycom_jax.data.sources import get_data_source
from polycom_jax.data.tokenizers import Tokenizer

# Documents tokenized ahead of the packer: enough to keep the threads busy, bounded memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=32)


class _Tokenize:
  """Example -> {inputs: [EOS, t1..tn], targets: [t1..tn, EOS]} int32; empty text -> empty."""

  def __init__(self, tokenizer: Tokenizer, text_feature: str):
    self._tokenizer, self._text_feature = tokenizer, text_feature

  def __call__(self, example) -> dict[str, np.ndarray]:
    text = example[self._text_feature]
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    ids = np.asarray(self._tokenizer.encode(text), np.int32)  # [n]
    if not len(ids):
      return {"inputs": ids, "targets": ids}
    eos = np.array([self._tokenizer.eos_id], np.int32)
    return {"inputs": np.concatenate([eos, ids]), "targets": np.concatenate([ids, eos])}


def _add_loss_mask(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds loss_mask [batch, seq_len] float32: 1 where the target is a real token."""
  return {"inputs": batch["inputs"], "targets": batch["targets"],
          "loss_mask": (batch["segment_ids"] > 0).astype(np.float32),
          "segment_ids": batch["segment_ids"], "positions": batch["positions"]}


def _process_shard(data_config, split: str, process_index: int,
                   process_count: int) -> grain.MapDataset:
  """This process's documents of `split`: every process_count-th, from process_index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  return grain.MapDataset.source(get_data_source(data_config, split))[
      process_index::process_count]


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker init: ends this worker as soon as the training process is gone.

  A training process killed with -9 cannot close its workers, and grain's own shutdown never
  runs: without this they live on for minutes (~250 MB each). A thread waits on the parent's
  sentinel (a pipe that reads end-of-file when the parent dies) and exits the worker.
  """
  del worker_index, worker_count
  parent = multiprocessing.parent_process()
  if parent is None:
    return

  def wait_then_exit():
    parent.join()
    os._exit(1)  # pylint: disable=protected-access  (no cleanup is owed to a dead parent)

  threading.Thread(target=wait_then_exit, name="exit-with-parent", daemon=True).start()


def _finish(ds: grain.IterDataset, data_config) -> grain.DatasetIterator:
  """Adds the loss mask and background prefetching (worker processes or one thread)."""
  ds = ds.map(_add_loss_mask)
  if data_config.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers, per_worker_buffer_size=max(1, data_config.prefetch)),
                        worker_init_fn=_exit_with_parent)
  elif data_config.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=data_config.prefetch)
  return iter(ds)


class _ProcessShare(grain.MapDataset):
  """Element i of process p: row (i // b) * B + p * b + i % b of the parent (b rows per
  process, B = b * process_count per global batch), endless: batch k of this dataset is this
  process's slice of global batch k."""

  def __init__(self, parent: grain.MapDataset, *, per_process: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._b, self._p, self._n = per_process, process_index, process_count

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, j = divmod(index, self._b)
    return self._parent[(step * self._n + self._p) * self._b + j]

  def __str__(self) -> str:
    return f"_ProcessShare(b={self._b}, p={self._p}/{self._n})"


def _prepared_train(data_config, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                    process_index: int, process_count: int) -> grain.DatasetIterator:
  rows = prepared.open_rows(data_config, tokenizer, "train")
  if len(rows) < batch_size * process_count:
    raise ConfigError(f"{rows.path} has {len(rows)} rows, fewer than one global batch "
                      f"({batch_size * process_count})")
  ds = _ProcessShare(grain.MapDataset.source(rows).shuffle(seed=seed), per_process=batch_size,
                     process_index=process_index, process_count=process_count)
  return _prefetch(ds.batch(batch_size).to_iter_dataset(_READ_OPTIONS), data_config)


def _prefetch(ds: grain.IterDataset, data_config) -> grain.DatasetIterator:
  """Prepared rows need no worker processes: one background thread reads ahead."""
  if data_config.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds,
                                                      prefetch_buffer_size=data_config.prefetch)
  return iter(ds)


@functools.cache
def _note_on_the_fly(window: int):
  """Said once per process: prepared data is the way for real runs."""
  print(f"note: packing the data on the fly, rows shuffled in a window of {window}: fine for "
        "quick experiments; for real runs prepare the data once (config.data.prepared=True, "
        "prepare_data.py)", file=sys.stderr)


def make_train_iterator(data_config, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Endless batches of config.data.train_split, reshuffled every epoch with `seed`."""
  if data_config.get("prepared", False):
    return _prepared_train(data_config, tokenizer, batch_size=batch_size, seed=seed,
                           process_index=process_index, process_count=process_count)
  if process_index == 0:
    _note_on_the_fly(data_config.get("shuffle_buffer_rows", 0))
  ds = _process_shard(data_config, data_config.train_split, process_index, process_count)
  if not len(ds):
    raise ConfigError(f"config.data.train_split={data_config.train_split!r} of "
                      f"{data_config.tfds_name!r} has fewer documents than the {process_count} "
                      "processes.")
  ds = ds.shuffle(seed=seed).repeat(None).map(_Tokenize(tokenizer, data_config.text_feature))
  ds = packing.PackIterDataset(ds.to_iter_dataset(_READ_OPTIONS), seq_len=data_config.seq_len,
                               pad_id=tokenizer.pad_id)
  if data_config.get("shuffle_buffer_rows", 0):
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=data_config.shuffle_buffer_rows, seed=seed)
  return _finish(ds.batch(batch_size, drop_remainder=True), data_config)


# (data config, tokenizer, batch size, max_batches, process count) -> (tokenizer, batches). The
# count tokenizes every process's shard, and the training loop evaluates many times: once a run.
_EVAL_BATCHES: dict[tuple, tuple[Tokenizer, int]] = {}


def _num_eval_batches(data_config, tokenizer: Tokenizer, *, batch_size: int, max_batches: int,
                      process_count: int) -> int:
  """The most batches any process's shard packs into (at most max_batches if > 0)."""
  key = (data_config.to_json_best_effort(sort_keys=True), id(tokenizer), batch_size, max_batches,
         process_count)
  if key not in _EVAL_BATCHES:        # the tokenizer is kept with its count: its id stays its own
    _EVAL_BATCHES[key] = tokenizer, _count_eval_batches(
        data_config, tokenizer, batch_size=batch_size, max_batches=max_batches,
        process_count=process_count)
  return _EVAL_BATCHES[key][1]


def _count_eval_batches(data_config, tokenizer: Tokenizer, *, batch_size: int, max_batches: int,
                        process_count: int) -> int:
  tokenize = _Tokenize(tokenizer, data_config.text_feature)
  cap = max_batches * batch_size * data_config.seq_len if max_batches else math.inf
  most = 0
  for process_index in range(process_count):
    tokens = 0
    for example in _process_shard(data_config, data_config.eval_split, process_index,
                                  process_count):
      tokens += len(tokenize(example)["inputs"])
      if tokens >= cap:
        break
    most = max(most, math.ceil(math.ceil(tokens / data_config.seq_len) / batch_size))
  return min(most, max_batches) if max_batches else most


def eval_sample(num_rows: int, global_batch: int, max_batches: int) -> np.ndarray:
  """The validation rows evaluated, in order: max_batches * global_batch rows drawn without
  replacement from the whole split by a fixed seed (all rows when 0 or when the split is
  smaller), padded with -1 (an empty row) to whole batches."""
  want = max_batches * global_batch if max_batches else num_rows
  if want < num_rows:
    rows = np.sort(np.random.default_rng(0).choice(num_rows, want, replace=False))
  else:
    rows = np.arange(num_rows)
  pad = -len(rows) % global_batch
  return np.concatenate([rows, np.full([pad], -1, rows.dtype)])


def _prepared_eval(data_config, tokenizer: Tokenizer, *, batch_size: int, max_batches: int,
                   process_index: int, process_count: int) -> grain.DatasetIterator:
  rows = prepared.open_rows(data_config, tokenizer, "eval")
  sample = eval_sample(len(rows), batch_size * process_count, max_batches)
  mine = sample.reshape(-1, process_count, batch_size)[:, process_index].reshape(-1)
  empty = _add_loss_mask(packing.empty_row(data_config.seq_len, tokenizer.pad_id))
  ds = grain.MapDataset.source(mine.tolist()).map(lambda i: rows[i] if i >= 0 else empty)
  return _prefetch(ds.batch(batch_size).to_iter_dataset(_READ_OPTIONS), data_config)


def make_eval_iterator(data_config, tokenizer: Tokenizer, *, batch_size: int,
                       max_batches: int = 0, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """Validation batches. Prepared: a fixed sample of rows from across the split (eval_sample).
  On the fly: one pass over config.data.eval_split, in order; padding rows (loss_mask 0) fill
  the last batch. At most max_batches batches (0: all). With several processes every process
  yields the same number of batches (on the fly: the largest shard's; this tokenizes the split
  once up front, the first time a run asks)."""
  if data_config.get("prepared", False):
    return _prepared_eval(data_config, tokenizer, batch_size=batch_size,
                          max_batches=max_batches, process_index=process_index,
                          process_count=process_count)
  ds = _process_shard(data_config, data_config.eval_split, process_index, process_count)
  ds = ds.map(_Tokenize(tokenizer, data_config.text_feature)).to_iter_dataset(_READ_OPTIONS)
  ds = packing.PackIterDataset(ds, seq_len=data_config.seq_len, pad_id=tokenizer.pad_id)
  total = None  # rows; None: pad only the last batch
  if process_count > 1:
    total = batch_size * _num_eval_batches(data_config, tokenizer, batch_size=batch_size,
                                           max_batches=max_batches, process_count=process_count)
  ds = packing.PadRowsIterDataset(ds, multiple=batch_size, total=total,
                                  seq_len=data_config.seq_len, pad_id=tokenizer.pad_id)
  ds = ds.batch(batch_size, drop_remainder=True)
  if max_batches:
    ds = grain.experimental.LimitIterDataset(ds, max_batches)
  return _finish(ds, data_config)
