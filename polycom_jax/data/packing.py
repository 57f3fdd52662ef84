"""Packs tokenized documents into fixed-length rows, with a small state that restores exactly.

Each document arrives as `inputs` = [EOS, t1..tn] and `targets` = [t1..tn, EOS] (EOS doubles
as the beginning-of-document token), so the rows tile one token stream with no token lost:
every document token, and the EOS ending it, is a target exactly once. Documents longer than
a row continue in the next row. grain's ConcatThenSplit does the same packing, but its state
holds tuples that a JSON round trip turns into lists, which its `set_state` then misreads.
"""

import copy
from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
  """Rows of `seq_len` tokens from documents {inputs, targets}: [n] int32 each.

  A row is {inputs, targets, segment_ids, positions}: [seq_len] int32 each. segment_ids
  count the document pieces in the row from 1 (0 = padding); positions restart at 0 in
  each piece. Only the final row of a finite parent has padding (ids = pad_id).
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> "PackDatasetIterator":
    return PackDatasetIterator(self._parent.__iter__(), seq_len=self._seq_len,
                               pad_id=self._pad_id)


class PackDatasetIterator(grain.DatasetIterator):
  """State: the parent's state before the current document, and how much of it is used."""

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._doc: dict[str, np.ndarray] | None = None  # the partly emitted document, if any
    self._doc_parent_state: dict[str, Any] | None = None
    self._offset = 0  # tokens of self._doc already emitted

  def _next_doc(self) -> bool:
    """Loads the next non-empty document; False when the parent is exhausted."""
    while True:
      state = copy.deepcopy(self._parent.get_state())
      try:
        doc = next(self._parent)
      except StopIteration:
        return False
      if len(doc["inputs"]):
        self._doc, self._doc_parent_state, self._offset = doc, state, 0
        return True

  def __next__(self) -> dict[str, np.ndarray]:
    n = self._seq_len
    inputs = np.full([n], self._pad_id, np.int32)
    targets = np.full([n], self._pad_id, np.int32)
    segment_ids = np.zeros([n], np.int32)
    positions = np.zeros([n], np.int32)
    filled, segment = 0, 0
    while filled < n:
      if self._doc is None and not self._next_doc():
        break
      take = min(n - filled, len(self._doc["inputs"]) - self._offset)
      piece = slice(self._offset, self._offset + take)
      inputs[filled:filled + take] = self._doc["inputs"][piece]
      targets[filled:filled + take] = self._doc["targets"][piece]
      segment += 1
      segment_ids[filled:filled + take] = segment
      positions[filled:filled + take] = np.arange(take, dtype=np.int32)
      filled += take
      self._offset += take
      if self._offset == len(self._doc["inputs"]):
        self._doc = None
    if filled == 0:
      raise StopIteration
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}
    return {"parent": copy.deepcopy(self._doc_parent_state), "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc = None
    if state["offset"]:  # re-read the partly emitted document
      if not self._next_doc():
        raise ValueError(f"Cannot restore packing state {state}: the parent is exhausted.")
      self._offset = state["offset"]


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only: segment_ids 0, so no loss and no attention to real tokens."""
  return {"inputs": np.full([seq_len], pad_id, np.int32),
          "targets": np.full([seq_len], pad_id, np.int32),
          "segment_ids": np.zeros([seq_len], np.int32),
          "positions": np.zeros([seq_len], np.int32)}


class PadRowsIterDataset(grain.IterDataset):
  """Stops after `total` rows (None: when the parent ends), padding with empty rows up to
  `total` or to a multiple of `multiple`, so eval batches have fixed shapes and counts."""

  def __init__(self, parent: grain.IterDataset, *, multiple: int, total: int | None,
               seq_len: int, pad_id: int):
    super().__init__(parent)
    self._multiple, self._total = multiple, total
    self._empty = empty_row(seq_len, pad_id)

  def __iter__(self) -> "PadRowsDatasetIterator":
    return PadRowsDatasetIterator(self._parent.__iter__(), multiple=self._multiple,
                                  total=self._total, empty=self._empty)


class PadRowsDatasetIterator(grain.DatasetIterator):
  """State: the parent's state and the number of rows emitted."""

  def __init__(self, parent: grain.DatasetIterator, *, multiple: int, total: int | None,
               empty: dict[str, np.ndarray]):
    super().__init__(parent)
    self._multiple, self._total, self._empty = multiple, total, empty
    self._emitted = 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self._total is not None and self._emitted >= self._total:
      raise StopIteration
    try:
      row = next(self._parent)
    except StopIteration:
      if self._total is None and self._emitted % self._multiple == 0:
        raise
      row = {k: v.copy() for k, v in self._empty.items()}
    self._emitted += 1
    return row

  def get_state(self) -> dict[str, Any]:
    return {"parent": copy.deepcopy(self._parent.get_state()), "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._emitted = state["emitted"]
