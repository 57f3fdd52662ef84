"""One path layer for what a run reads and writes: local paths and gs:// URIs alike.

Everything under the workdir (checkpoints through Orbax, metrics, TensorBoard, eval files, the
compilation cache, the run lock) and the prepared data go through here or through a library
that takes the same URIs (Orbax/TensorStore, tensorboardX, grain's ArrayRecord reader). The
backend is etils.epath, which hands gs:// to fsspec's gcsfs; a few operations epath lacks
(exclusive create, moving a folder) use that fsspec filesystem directly.

Object stores have no rename and no append: a "folder" move is a copy and delete (mv), and a
file that grows (metrics.jsonl) is written again whole (see metrics.MetricWriter).
"""

from __future__ import annotations

import os
import tempfile

from etils import epath

from polycom_jax.config_errors import ConfigError

SCHEMES = ("gs",)


def _no_listings_cache():
  """gcsfs caches folder listings for the life of the process, but TensorStore, tensorboardX
  and other hosts write objects behind its back: a cached listing would miss a checkpoint that
  was committed since. Every gcsfs instance (epath's included) lists afresh."""
  import fsspec  # pylint: disable=g-import-not-at-top
  for scheme in SCHEMES:
    fsspec.config.conf.setdefault(scheme, {})["use_listings_cache"] = False


_no_listings_cache()


def is_uri(path: str) -> bool:
  return "://" in str(path)


def resolve(path: str, flag: str = "path") -> str:
  """An absolute local path (~ expanded), or the gs:// URI without a trailing slash. A URI of
  another scheme is a ConfigError naming `flag`."""
  path = str(path)
  if not is_uri(path):
    return os.path.abspath(os.path.expanduser(path))
  scheme, rest = path.split("://", 1)
  if scheme not in SCHEMES or not rest.strip("/"):
    supported = ", ".join(f"{s}://BUCKET/..." for s in SCHEMES)
    raise ConfigError(f"{flag}={path}: only local paths and {supported} URIs are supported")
  return path.rstrip("/")


def join(base: str, *parts: str) -> str:
  return os.path.join(str(base), *parts)      # "/" joins URIs too


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
  """Names in a folder (an empty list when it does not exist)."""
  p = epath.Path(path)
  return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def glob(pattern_dir: str, pattern: str) -> list[str]:
  p = epath.Path(pattern_dir)
  return sorted(str(x) for x in p.glob(pattern)) if p.is_dir() else []


def makedirs(path: str):
  """A local folder and its parents; nothing for a URI (an object store has no folders)."""
  if not is_uri(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def write_text(path: str, text: str):
  """Writes the whole file so that a reader sees the old or the new text, never a part: a local
  temporary file renamed over it, or one object upload (GCS replaces objects atomically)."""
  if is_uri(path):
    epath.Path(path).write_text(text, encoding="utf-8")
    return
  folder = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def remove(path: str):
  epath.Path(path).unlink(missing_ok=True)


def move_tree(src: str, dst: str):
  """A folder to a new name: a rename locally, a copy and delete of its objects on GCS."""
  if not is_uri(src):
    os.rename(src, dst)
    return
  fs = filesystem(src)
  fs.mv(src, dst, recursive=True)


def copy_file(src: str, dst: str):
  epath.Path(src).copy(epath.Path(dst), overwrite=True)


def filesystem(uri: str):
  """The fsspec filesystem epath uses for this URI's scheme."""
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem(uri.split("://", 1)[0])
