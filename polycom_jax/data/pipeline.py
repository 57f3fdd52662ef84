"""grain pipelines: TFDS source -> process shard -> (shuffle, repeat) -> tokenize -> pack -> batch.

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

import math

import grain
import numpy as np

from polycom_jax.config_errors import ConfigError
from polycom_jax.data import packing
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


def _finish(ds: grain.IterDataset, data_config) -> grain.DatasetIterator:
  """Adds the loss mask and background prefetching (worker processes or one thread)."""
  ds = ds.map(_add_loss_mask)
  if data_config.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers, per_worker_buffer_size=max(1, data_config.prefetch)))
  elif data_config.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=data_config.prefetch)
  return iter(ds)


def make_train_iterator(data_config, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Endless packed batches of config.data.train_split, reshuffled every epoch with `seed`."""
  ds = _process_shard(data_config, data_config.train_split, process_index, process_count)
  if not len(ds):
    raise ConfigError(f"config.data.train_split={data_config.train_split!r} of "
                      f"{data_config.tfds_name!r} has fewer documents than the {process_count} "
                      "processes.")
  ds = ds.shuffle(seed=seed).repeat(None).map(_Tokenize(tokenizer, data_config.text_feature))
  ds = packing.PackIterDataset(ds.to_iter_dataset(_READ_OPTIONS), seq_len=data_config.seq_len,
                               pad_id=tokenizer.pad_id)
  return _finish(ds.batch(batch_size, drop_remainder=True), data_config)


def _num_eval_batches(data_config, tokenizer: Tokenizer, *, batch_size: int, max_batches: int,
                      process_count: int) -> int:
  """The most batches any process's shard packs into (at most max_batches if > 0)."""
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


def make_eval_iterator(data_config, tokenizer: Tokenizer, *, batch_size: int,
                       max_batches: int = 0, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """One pass over config.data.eval_split, in order; padding rows (loss_mask 0) fill the last
  batch. At most max_batches batches (0: all). With several processes every process yields
  the same number of batches (the largest shard's; this tokenizes the split once up front)."""
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
