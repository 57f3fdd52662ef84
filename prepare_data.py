"""Tokenize a corpus once into fixed-length training rows (ArrayRecord shards + manifest.json).

  python prepare_data.py --config=configs/default.py [--config.data.train_files='corpus/*.parquet'
      --config.data.eval_files='corpus/val/*.parquet' --config.data.text_feature=text
      --config.data.tokenizer=huggingface --config.data.tokenizer_path=tokenizer.json]
      [--split=train,eval] [--workers=N]

Writes DATA_DIR/prepared/<split>-<key> (config.data.prepared_dir to choose the folder), where
train.py and eval.py with the same config find it; preparing again reuses it. Sources: the
built-in corpus (or config.data.text_glob), any TFDS dataset prepared in array_record format
(config.data.tfds_name), JSONL / Parquet files (config.data.train_files / eval_files).
"""

from absl import app, flags
from ml_collections import config_flags

from polycom_jax import cli
from polycom_jax import data as data_lib
from polycom_jax.config_errors import ConfigError
from polycom_jax.data import prepared

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_SPLIT = flags.DEFINE_list("split", ["train", "eval"], "Splits to prepare: train, eval.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Tokenizer processes (0: the machine's cores).")


def _prepare():
  data_config = _CONFIG.value.data
  data_lib.check_data_config(data_config)
  tokenizer = data_lib.get_tokenizer(data_config)
  for split in _SPLIT.value:
    if split not in ("train", "eval"):
      raise ConfigError(f"--split: {split!r} is not one of train, eval")
    path = prepared.prepare(data_config, tokenizer, split, _WORKERS.value)
    manifest = prepared.read_manifest(path)
    print(f"{split}: {path}: {manifest['rows']:,} rows of {manifest['seq_len']} tokens "
          f"({manifest['tokens']:,} tokens from {manifest['documents']:,} documents)")


def main(argv):
  del argv
  cli.run(_prepare, config=_CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
