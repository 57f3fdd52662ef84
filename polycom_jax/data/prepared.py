"""Prepared datasets: a corpus tokenized once into fixed-length training rows (ArrayRecord).

Every document becomes [EOS, t1..tn] (EOS doubling as BOS, as on the fly) and the documents are
concatenated into one token stream S in source order. Row r is the window S[r*T : r*T + T + 1]
(T = seq_len): inputs = window[:-1], targets = window[1:], so every token is a target exactly once
and no row has padding; the last partial window is dropped (< T tokens per split). A row holds
only its T + 1 tokens (uint16 when the vocabulary fits, else int32); segment ids and positions
are derived from the EOS tokens when a row is read (a document piece starts at each EOS, and at
the row's start), as the packer on the fly makes them.

A directory per (source, split, tokenizer and its file's hash, seq_len, format version), under
DATA_DIR/prepared/: `rows-NNNNN.array_record` shards and `manifest.json` (source, tokenizer,
seq_len, dtype, row, token and document counts, split, shards). It is written in a temporary
folder and renamed into place with its manifest, so an interrupted preparation is never taken
for a finished one; preparing again finds it and does nothing. config.data.prepared_dir may be a
gs:// URI: the rows are then written in a local temporary folder and uploaded, the manifest
last (an object store has no rename; no manifest still means unfinished), and read from the
bucket by grain's ArrayRecord reader. Tokenization runs in worker
processes (spawned: the parent may hold JAX's threads) in source order, so the bytes written do
not depend on the number of workers.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np
from array_record.python import array_record_module

from polycom_jax import paths
from polycom_jax.config_errors import ConfigError
from polycom_jax.data import sources, tokenizers

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROWS_PER_SHARD = 8192


# ---- documents ----------------------------------------------------------------------------------

def _file_texts(paths: list[str], text_field: str) -> Iterator[str]:
  """The `text_field` of every record of JSONL / Parquet files, in file order."""
  for path in paths:
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          if line.strip():
            record = json.loads(line)
            if text_field not in record:
              raise ConfigError(f"{path}:{n}: no field config.data.text_feature="
                                f"{text_field!r} (fields: {sorted(record)[:10]})")
            yield record[text_field]
    else:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (only for Parquet)
      table = pq.ParquetFile(path)
      if text_field not in table.schema_arrow.names:
        raise ConfigError(f"{path}: no column config.data.text_feature={text_field!r} "
                          f"(columns: {table.schema_arrow.names[:10]})")
      for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def source_spec(data_config, split: str) -> dict:
  """What identifies the documents of a split: a glob of files, or a TFDS dataset and split."""
  if data_config.get("train_files", ""):
    field = {"train": "train_files", "eval": "eval_files"}[split]
    files = sources.split_files(data_config, field)
    stats = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    return {"kind": "files", "glob": os.path.abspath(os.path.expanduser(data_config[field])),
            "field": data_config.text_feature, "files": stats}
  tfds_split = data_config.train_split if split == "train" else data_config.eval_split
  spec = {"kind": "tfds", "name": data_config.tfds_name, "split": tfds_split,
          "feature": data_config.text_feature}
  if data_config.tfds_name == sources.builtin_corpus.NAME:
    spec["corpus"] = sources.builtin_corpus.corpus_config(data_config.text_glob).name
  else:
    spec["data_dir"] = sources.resolve_data_dir(data_config)
  return spec


def _texts(data_config, spec: dict) -> tuple[int | None, Iterator[str]]:
  """(the number of documents, when the source knows it up front; the documents' texts)."""
  if spec["kind"] == "files":
    return None, _file_texts([p for p, _, _ in spec["files"]], spec["field"])
  source = sources.get_data_source(data_config, spec["split"])
  feature = spec["feature"]

  def texts():
    for i in range(len(source)):
      text = source[i][feature]
      yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
  return len(source), texts()


# ---- tokenization (worker processes) ------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_fields: dict):
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizers.get_tokenizer(_Fields(tokenizer_fields))


class _Fields(dict):
  """A plain dict that reads like the config.data ConfigDict the tokenizer factory takes."""
  __getattr__ = dict.__getitem__


def _encode(texts: list[str]) -> list[np.ndarray]:
  tok = _WORKER_TOKENIZER
  return [np.asarray(tok.encode(t), np.int32) for t in texts]


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
  chunk = []
  for t in texts:
    chunk.append(t)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


# ---- writing ------------------------------------------------------------------------------------

def tokenizer_spec(data_config, tokenizer) -> dict:
  """The tokenizer as the manifest records it; its file's sha256 tells edited files apart."""
  path = data_config.tokenizer_path
  digest = ""
  if data_config.tokenizer != "byte" and path:
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  return {"kind": data_config.tokenizer, "path": os.path.abspath(path) if path else "",
          "sha256": digest, "vocab_size": int(tokenizer.vocab_size),
          "eos_id": int(tokenizer.eos_id)}


def directory(data_config, tokenizer, split: str) -> tuple[str, dict]:
  """(the prepared directory for this config's split, the key fields that name it)."""
  key = {"format": FORMAT_VERSION, "source": source_spec(data_config, split), "split": split,
         "tokenizer": tokenizer_spec(data_config, tokenizer), "seq_len": data_config.seq_len}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  root = data_config.get("prepared_dir", "") or os.path.join(sources.resolve_data_dir(
      data_config), "prepared")
  root = paths.resolve(root, "config.data.prepared_dir")
  return paths.join(root, f"{split}-{digest}"), key


def _progress(rows: int, tokens: int, docs: int, start: float, total_docs: int | None):
  rate = tokens / max(time.time() - start, 1e-9)
  eta = ""
  if total_docs:
    left = (time.time() - start) / max(docs, 1) * (total_docs - docs)
    eta = f", ETA {left:.0f} s"
  print(f"\r  prepared {rows:,} rows, {tokens:,} tokens from {docs:,} documents "
        f"({rate / 1e6:.2f}M tokens/s{eta})", end="", file=sys.stderr, flush=True)


def _write(out: str, data_config, tokenizer, spec: dict, workers: int) -> dict:
  """Tokenizes, packs and writes the rows into `out` (a fresh folder); returns the counts."""
  seq_len, eos = data_config.seq_len, tokenizer.eos_id
  dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32
  fields = {k: data_config[k] for k in ("tokenizer", "tokenizer_path")}
  total_docs, texts = _texts(data_config, spec)
  if workers > 1:
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (fields,))
  else:
    pool = None
    _init_worker(fields)
  encode = pool.imap if pool is not None else map
  encoded = (ids for chunk in encode(_encode, _chunks(texts, 64)) for ids in chunk)
  shards, writer, rows, tokens, docs, skipped = [], None, 0, 0, 0, 0
  pending = np.zeros([0], dtype)        # the stream not yet written (< seq_len + 1 tokens)
  start, last_print = time.time(), 0.0
  try:
    for ids in encoded:
      docs += 1
      if not len(ids):
        skipped += 1
        continue
      pending = np.concatenate([pending, np.asarray([eos], dtype), ids.astype(dtype)])
      while len(pending) >= seq_len + 1:
        if writer is None or rows % ROWS_PER_SHARD == 0:
          if writer is not None:
            writer.close()
          shards.append(f"rows-{len(shards):05d}.array_record")
          writer = array_record_module.ArrayRecordWriter(os.path.join(out, shards[-1]),
                                                         "group_size:1")
        writer.write(pending[:seq_len + 1].tobytes())
        pending = pending[seq_len:]        # the last token of a row starts the next one
        rows += 1
        tokens += seq_len
      if time.time() - last_print > 1.0:
        _progress(rows, tokens, docs, start, total_docs)
        last_print = time.time()
  finally:
    if writer is not None:
      writer.close()
    if pool is not None:
      pool.terminate()
  _progress(rows, tokens, docs, start, total_docs)
  print(file=sys.stderr)
  return {"rows": rows, "tokens": tokens, "documents": docs, "empty_documents": skipped,
          "dtype": np.dtype(dtype).name, "shards": shards,
          "seconds": round(time.time() - start, 2), "workers": workers}


def prepare(data_config, tokenizer, split: str, workers: int = 0) -> str:
  """The prepared directory of `split` ("train" or "eval"), written first if it is missing.
  workers: tokenizer processes (0: this machine's cores, 1: in this process)."""
  out, key = directory(data_config, tokenizer, split)
  manifest_path = paths.join(out, MANIFEST)
  if paths.exists(manifest_path):
    return out
  # A gs:// directory is prepared in a local folder, then uploaded; its lock is local (two
  # hosts preparing the same rows write the same bytes).
  local = not paths.is_uri(out)
  staging = os.path.dirname(out) if local else os.path.join(
      tempfile.gettempdir(), "polycom_jax_prepared", hashlib.sha256(out.encode()).hexdigest()[:16])
  lock_path = os.path.join(staging, os.path.basename(out) + ".lock")
  try:
    os.makedirs(staging, exist_ok=True)
    lock = open(lock_path, "w")
  except OSError as e:
    field = "prepared_dir" if data_config.get("prepared_dir", "") else "data_dir"
    raise ConfigError(f"config.data.{field}: cannot write the prepared rows under "
                      f"{staging} ({e.strerror or e})") from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)       # another process preparing the same: wait for it
    if paths.exists(manifest_path):
      return out
    workers = workers or min(os.cpu_count() or 1, 8)
    base = os.path.join(staging, os.path.basename(out))
    tmp = f"{base}.tmp-{os.getpid()}"
    for stale in glob.glob(f"{base}.tmp-*"):  # left by a killed preparation
      shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    print(f"preparing the {split} rows of {key['source'].get('name') or key['source']['glob']} "
          f"(seq_len {data_config.seq_len}, {workers} worker(s)) into {out}", file=sys.stderr)
    counts = _write(tmp, data_config, tokenizer, key["source"], workers)
    if not counts["rows"]:
      shutil.rmtree(tmp)
      raise ConfigError(f"the {split} split has fewer than seq_len + 1 = "
                        f"{data_config.seq_len + 1} tokens: no row to train on")
    manifest = json.dumps({**key, **counts}, indent=1)
    if local:
      with open(os.path.join(tmp, MANIFEST), "w") as f:
        f.write(manifest)
      os.rename(tmp, out)
    else:
      for shard in counts["shards"]:
        paths.copy_file(os.path.join(tmp, shard), paths.join(out, shard))
      paths.write_text(manifest_path, manifest)
      shutil.rmtree(tmp)
  return out


# ---- reading ------------------------------------------------------------------------------------

def read_manifest(path: str) -> dict:
  manifest_path = paths.join(path, MANIFEST)
  if not paths.exists(manifest_path):
    if paths.glob(path, "*.array_record") or path.rsplit(".tmp-", 1)[0] != path:
      raise ConfigError(f"{path} is an unfinished preparation (no {MANIFEST}): delete it and "
                        "prepare again")
    raise ConfigError(f"{path} holds no prepared dataset (no {MANIFEST})")
  try:
    return json.loads(paths.read_text(manifest_path))
  except ValueError as e:
    raise ConfigError(f"{manifest_path} is not valid JSON ({e}): delete {path} and prepare "
                      "again") from None


def check_manifest(manifest: dict, data_config, tokenizer, where: str):
  """A ConfigError naming both values when the rows were made for another seq_len, tokenizer
  or format."""
  want = tokenizer_spec(data_config, tokenizer)
  checks = [("format", manifest.get("format"), FORMAT_VERSION),
            ("config.data.seq_len", manifest.get("seq_len"), data_config.seq_len),
            ("config.data.tokenizer", manifest.get("tokenizer", {}).get("kind"), want["kind"]),
            ("the tokenizer file's sha256", manifest.get("tokenizer", {}).get("sha256"),
             want["sha256"]),
            ("the tokenizer's vocab_size", manifest.get("tokenizer", {}).get("vocab_size"),
             want["vocab_size"])]
  for name, found, expected in checks:
    if found != expected:
      raise ConfigError(f"{where} was prepared with {name}={found!r}, but this run has "
                        f"{expected!r}")


class PreparedRows:
  """Random access to the rows of a prepared directory: row i -> {inputs, targets, loss_mask,
  segment_ids, positions} [seq_len] each (the packer's format)."""

  def __init__(self, path: str, eos_id: int):
    import grain  # pylint: disable=g-import-not-at-top
    self.path, self.manifest, self._eos = path, read_manifest(path), eos_id
    self._dtype = np.dtype(self.manifest["dtype"])
    shards = [paths.join(path, s) for s in self.manifest["shards"]]
    missing = [p for p in shards if not paths.exists(p)]
    if missing:
      raise ConfigError(f"{path}: shard {missing[0]} listed in {MANIFEST} is missing: delete "
                        f"{path} and prepare again")
    self._source = grain.sources.ArrayRecordDataSource(shards)
    if len(self._source) != self.manifest["rows"]:
      raise ConfigError(f"{path}: {len(self._source)} rows on disk, {self.manifest['rows']} in "
                        f"{MANIFEST}: delete {path} and prepare again")

  def __len__(self) -> int:
    return self.manifest["rows"]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    window = np.frombuffer(self._source[index], self._dtype).astype(np.int32)
    return row_from_window(window, self._eos)

  def __repr__(self) -> str:
    return f"PreparedRows({self.path!r})"


def row_from_window(window: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """A row from its T + 1 stream tokens: a document piece starts at each EOS (and at 0)."""
  inputs, targets = window[:-1], window[1:]
  starts = inputs == eos_id
  starts[0] = True
  segment_ids = np.cumsum(starts, dtype=np.int32)
  idx = np.arange(len(inputs), dtype=np.int32)
  positions = idx - np.maximum.accumulate(np.where(starts, idx, 0)).astype(np.int32)
  return {"inputs": inputs, "targets": targets, "loss_mask": np.ones(len(inputs), np.float32),
          "segment_ids": segment_ids, "positions": positions}


def open_rows(data_config, tokenizer, split: str) -> PreparedRows:
  """The prepared rows this config trains (split "train") or evaluates on ("eval"): a given
  config.data.prepared_train / prepared_eval directory (checked against the config), else
  prepared here on first use."""
  given = data_config.get(f"prepared_{split}", "")
  given = given and paths.resolve(given, f"config.data.prepared_{split}")
  path = given or prepare(data_config, tokenizer, split, data_config.get("prepare_workers", 0))
  rows = PreparedRows(path, tokenizer.eos_id)
  check_manifest(rows.manifest, data_config, tokenizer,
                 where=f"config.data.prepared_{split}={given!r}" if given else path)
  return rows


def describe(manifest: dict) -> dict[str, Any]:
  return {k: manifest[k] for k in ("rows", "tokens", "documents", "seq_len", "split")}
