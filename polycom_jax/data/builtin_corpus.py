"""`polycom_builtin_corpus`: a TFDS dataset of local text files, one example per file.

By default the files are Python's own standard library sources (real text on every machine
that runs this code); `config.data.text_glob` selects any other files. Each distinct file set
is its own builder config (named by a fingerprint of the glob and the files' paths, sizes
and mtimes), so corpora never collide in one data_dir and edited files are re-prepared.
Validation holds ~3% of the DOCUMENTS, chosen by a hash of each file's relative path.
Prepared as array_record, read back through `as_data_source`: TensorFlow is not needed.
"""

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import sys
import sysconfig

from etils import epath
import tensorflow_datasets as tfds

from polycom_jax.config_errors import ConfigError

NAME = "polycom_builtin_corpus"
FEATURES = ("text", "id")
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.03
# The default stdlib corpus: ~10 MB of .py files, without tests and installed packages.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                              "__pycache__", "turtledemo"})
STDLIB_MAX_FILE_BYTES = 256 * 1024  # larger files are mostly generated data (pydoc topics)
STDLIB_MAX_TOTAL_BYTES = 32 * 1024 * 1024


@dataclasses.dataclass
class CorpusConfig(tfds.core.BuilderConfig):
  """A builder config listing the files of one corpus: ((path, relative_path), ...)."""

  documents: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)


def _stdlib_documents() -> list[tuple[str, str]]:
  """The default corpus: stdlib .py files sorted by path, within the size caps."""
  root = sysconfig.get_paths()["stdlib"]
  documents, total = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      size = os.path.getsize(path) if name.endswith(".py") else 0
      if 0 < size <= STDLIB_MAX_FILE_BYTES and total + size <= STDLIB_MAX_TOTAL_BYTES:
        documents.append((path, os.path.relpath(path, root)))
        total += size
  return documents


def _glob_documents(text_glob: str) -> list[tuple[str, str]]:
  """Non-empty files matching a (recursive) glob, sorted, paths relative to its fixed prefix."""
  pattern = os.path.abspath(os.path.expanduser(text_glob))
  prefix = pattern[:min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))]
  root = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ConfigError(f"config.data.text_glob={text_glob!r} matches no files.")
  nonempty = [p for p in paths if os.path.getsize(p) > 0]
  documents = [(p, os.path.relpath(p, root)) for p in nonempty if not is_binary(p)]
  binary = len(nonempty) - len(documents)
  if binary and text_glob not in _REPORTED:
    _REPORTED.add(text_glob)
    print(f"note: config.data.text_glob={text_glob!r}: skipped {binary} binary file(s) (NUL "
          "bytes or not UTF-8 in their first 8 KiB)", file=sys.stderr)
  if not documents:
    raise ConfigError(f"config.data.text_glob={text_glob!r} matches no non-empty text files "
                      f"({len(paths)} files, {binary} binary).")
  return documents


_REPORTED: set[str] = set()


def is_binary(path: str, probe: int = 8192) -> bool:
  """Whether a file looks binary: a NUL byte, or bytes that are not UTF-8, in its first
  `probe` bytes (a multi-byte character cut at the end of the probe is allowed)."""
  with open(path, "rb") as f:
    head = f.read(probe)
  if b"\0" in head:
    return True
  try:
    head.decode("utf-8")
  except UnicodeDecodeError as e:
    return e.start < len(head) - 3      # not just a character cut by the probe
  return False


def list_documents(text_glob: str) -> list[tuple[str, str]]:
  """The corpus files as (path, relative_path): the stdlib for an empty glob. Cheap: no reads."""
  documents = _glob_documents(text_glob) if text_glob else _stdlib_documents()
  if len(documents) < 2:
    raise ConfigError(f"config.data.text_glob={text_glob!r} gives {len(documents)} non-empty "
                      "file; train and validation need at least 2 documents.")
  return documents


def _bucket(relative_path: str) -> float:
  """A stable number in [0, 1) from a document's relative path."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def validation_paths(relative_paths: list[str]) -> set[str]:
  """The held-out documents: bucket < VALIDATION_FRACTION, at least one, never all."""
  held_out = {r for r in relative_paths if _bucket(r) < VALIDATION_FRACTION}
  if not held_out:
    held_out = {min(relative_paths, key=_bucket)}
  if len(held_out) == len(relative_paths):
    held_out.remove(max(held_out, key=_bucket))
  return held_out


def corpus_config(text_glob: str) -> CorpusConfig:
  """The builder config of a glob's current file set (name = fingerprint of glob + files)."""
  documents = list_documents(text_glob)
  stats = []
  for path, rel in documents:
    st = os.stat(path)
    stats.append((rel, st.st_size, st.st_mtime_ns))
  key = json.dumps([os.path.abspath(text_glob) if text_glob else "stdlib", stats,
                    VALIDATION_FRACTION, STDLIB_MAX_FILE_BYTES, STDLIB_MAX_TOTAL_BYTES])
  fingerprint = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
  name = f"{'glob' if text_glob else 'stdlib'}_{fingerprint}"
  return CorpusConfig(name=name, description=f"text_glob={text_glob!r}",
                      documents=tuple(documents))


class PolycomBuiltinCorpus(tfds.core.GeneratorBasedBuilder):
  """Local text files as a TFDS dataset: features `text` (file contents) and `id` (path)."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's own lookup needs `importlib_resources` (a py<3.9 backport) for packaged builders.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs needs a metadata dir next to the module.
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                           "id": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    documents = self.builder_config.documents
    held_out = validation_paths([rel for _, rel in documents])
    return {
        "train": self._generate_examples([d for d in documents if d[1] not in held_out]),
        "validation": self._generate_examples([d for d in documents if d[1] in held_out]),
    }

  def _generate_examples(self, documents):
    for path, rel in documents:
      with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
      yield rel, {"text": text, "id": rel}


def prepare_builtin_corpus(data_dir: str, text_glob: str) -> PolycomBuiltinCorpus:
  """The prepared builder for text_glob in data_dir; prepares once, under a file lock."""
  config = corpus_config(text_glob)
  builder = PolycomBuiltinCorpus(data_dir=data_dir, config=config)
  if builder.info.splits:  # the splits were read from a prepared dir at construction
    return builder
  lock_dir = os.path.join(data_dir, NAME)
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, f"{config.name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds it prepared
    builder = PolycomBuiltinCorpus(data_dir=data_dir, config=config)
    if not builder.is_prepared():
      builder.download_and_prepare(file_format="array_record")
  return builder
