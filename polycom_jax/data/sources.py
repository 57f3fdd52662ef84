"""Validates config.data and opens random-access TFDS data sources (array_record, no TF)."""

import glob
import os
import re

import tensorflow_datasets as tfds

from polycom_jax.config_errors import ConfigError
from polycom_jax.data import builtin_corpus
from polycom_jax.data import tokenizers

DEFAULT_DATA_DIR = "./data_cache"
FILE_KINDS = (".jsonl", ".parquet")


def split_files(data_config, field: str) -> list[str]:
  """The files of config.data.train_files or eval_files (eval_files must be given with
  train_files)."""
  pattern = data_config.get(field, "")
  if not pattern:
    raise ConfigError(f"config.data.train_files is set, so config.data.{field} must name the "
                      "validation files too")
  return file_paths(pattern, field)


def file_paths(pattern: str, field: str) -> list[str]:
  """The JSONL / Parquet files of config.data.{field}, sorted; a ConfigError names the field."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise ConfigError(f"config.data.{field}={pattern!r} matches no files")
  bad = [p for p in paths if not p.endswith(FILE_KINDS)]
  if bad:
    raise ConfigError(f"config.data.{field}: {bad[0]} is neither .jsonl nor .parquet")
  return paths


def resolve_data_dir(data_config) -> str:
  """config.data.data_dir, or ./data_cache when empty."""
  return os.path.abspath(os.path.expanduser(data_config.data_dir or DEFAULT_DATA_DIR))


def _split_base(split: str) -> str:
  """'train[:10%]' -> 'train': the split name without a TFDS slice."""
  return re.match(r"[\w-]*", split).group()


def _split_field(data_config, split: str) -> str:
  """The config field a split name came from, for error messages."""
  for field in ("train_split", "eval_split"):
    if data_config.get(field) == split:
      return f"config.data.{field}"
  return "split"


def check_data_config(data_config) -> None:
  """Raises ConfigError for any bad config.data value, before preparing or reading data.

  Checks the scalar fields, the tokenizer file, and that the dataset, both splits and the
  text feature exist (for the built-in corpus: that text_glob matches non-empty files).
  """
  if not isinstance(data_config.seq_len, int) or data_config.seq_len <= 1:
    raise ConfigError(f"config.data.seq_len={data_config.seq_len!r} must be an int > 1.")
  for field in ("num_workers", "prefetch"):
    value = data_config.get(field)
    if not isinstance(value, int) or value < 0:
      raise ConfigError(f"config.data.{field}={value!r} must be an int >= 0.")
  for field in ("shuffle_buffer_rows", "prepare_workers"):
    value = data_config.get(field, 0)
    if not isinstance(value, int) or value < 0:
      raise ConfigError(f"config.data.{field}={value!r} must be an int >= 0.")
  tokenizers.check_tokenizer_config(data_config)
  if data_config.get("train_files", ""):
    if not data_config.get("prepared", False):
      raise ConfigError("config.data.train_files (JSONL / Parquet) are read through prepared "
                        "rows: set config.data.prepared=True")
    split_files(data_config, "train_files")
    split_files(data_config, "eval_files")
    _make_data_dir(data_config)
    return
  if data_config.tfds_name == builtin_corpus.NAME:
    builtin_corpus.list_documents(data_config.text_glob)
    _make_data_dir(data_config)
    if data_config.text_feature not in builtin_corpus.FEATURES:
      raise ConfigError(f"config.data.text_feature={data_config.text_feature!r} is not a feature "
                        f"of {builtin_corpus.NAME}; available: {list(builtin_corpus.FEATURES)}.")
    for field in ("train_split", "eval_split"):
      if _split_base(data_config[field]) not in builtin_corpus.SPLITS:
        raise ConfigError(f"config.data.{field}={data_config[field]!r} is not a split of "
                          f"{builtin_corpus.NAME}; available: {list(builtin_corpus.SPLITS)}.")
    return
  for split in (data_config.train_split, data_config.eval_split):
    get_data_source(data_config, split)  # opening a prepared source reads only metadata


def _tfds_source(data_config, split: str):
  """(builder, source of `split`) of a registered or on-disk TFDS dataset, with ConfigErrors
  that say what to do when it is missing, unprepared, not random-access, or lacks the split."""
  name, data_dir = data_config.tfds_name, resolve_data_dir(data_config)
  if not os.path.isdir(data_dir):
    raise ConfigError(f"config.data.data_dir={data_config.data_dir!r} ({data_dir}) does not exist; "
                      f"prepare config.data.tfds_name={name!r} there first.")
  how = (f"prepare it with `tfds build {name} --data_dir={data_dir} --file_format=array_record` "
         f"(or builder.download_and_prepare(file_format='array_record'))")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise ConfigError(f"config.data.tfds_name={name!r} is neither a registered TFDS dataset nor "
                      f"prepared in config.data.data_dir={data_dir!r}; {how}.") from e
  try:
    return builder, builder.as_data_source(split)
  except Exception as e:  # explain the common causes; re-raise anything else unchanged
    if not builder.is_prepared():
      raise ConfigError(f"config.data.tfds_name={name!r} is not prepared in "
                        f"config.data.data_dir={data_dir!r}; {how}.") from e
    if builder.info.file_format not in (tfds.core.FileFormat.ARRAY_RECORD,
                                        tfds.core.FileFormat.PARQUET):
      raise ConfigError(f"config.data.tfds_name={name!r} in {data_dir!r} is stored as "
                        f"{builder.info.file_format.value}; random access needs array_record: "
                        f"{how}.") from e
    available = sorted(builder.info.splits)
    if _split_base(split) not in available:
      raise ConfigError(f"{_split_field(data_config, split)}={split!r} is not a split of "
                        f"{name!r}; available: {available}.") from e
    raise


def _make_data_dir(data_config) -> str:
  """Creates data_dir for the built-in corpus (a cache, so creating it is fine)."""
  data_dir = resolve_data_dir(data_config)
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"config.data.data_dir={data_config.data_dir!r} ({data_dir}) cannot be "
                      f"created: {e}") from e
  return data_dir


def _builtin_source(data_config, split: str):
  """(builder, source of `split`) of the built-in corpus, prepared in data_dir if needed."""
  data_dir = _make_data_dir(data_config)
  builder = builtin_corpus.prepare_builtin_corpus(data_dir, data_config.text_glob)
  if _split_base(split) not in builder.info.splits:
    raise ConfigError(f"{_split_field(data_config, split)}={split!r} is not a split of "
                      f"{builtin_corpus.NAME}; available: {sorted(builder.info.splits)}.")
  return builder, builder.as_data_source(split)


def get_data_source(data_config, split: str):
  """Random-access source of `split` (examples are dicts of features); prepares the built-in
  corpus in data_dir on first use."""
  if data_config.tfds_name == builtin_corpus.NAME:
    builder, source = _builtin_source(data_config, split)
  else:
    builder, source = _tfds_source(data_config, split)
  features = list(builder.info.features.keys())
  if data_config.text_feature not in features:
    raise ConfigError(f"config.data.text_feature={data_config.text_feature!r} is not a feature of "
                      f"{data_config.tfds_name!r}; available: {features}.")
  return source


# config.data fields that decide which rows a data position points at: a run resumed with any of
# them changed cannot carry its data position over.
POSITION_FIELDS = ("tfds_name", "text_glob", "train_split", "train_files", "text_feature",
                   "tokenizer", "tokenizer_path", "seq_len", "shuffle_seed", "prepared",
                   "prepared_train", "shuffle_buffer_rows", "num_workers")


def check_resumable(saved: dict, current: dict, step: int) -> None:
  """A one-line ConfigError naming the first config.data field that changed since the step's
  checkpoint in a way its data position cannot follow (num_workers and shuffle_buffer_rows
  matter on the fly only)."""
  for name in POSITION_FIELDS:
    if name in ("num_workers", "shuffle_buffer_rows") and current.get("prepared"):
      continue
    a, b = saved.get(name), current.get(name)
    if name not in saved:                  # a checkpoint from before the field existed
      continue
    if a != b:
      raise ConfigError(
          f"config.data.{name} is {b!r} but the step-{step} checkpoint was trained with {a!r}: "
          "its data position does not carry over; resume with the old value, or train in a new "
          "--workdir")
