"""JAX's persistent compilation cache, on by default for train.py and eval.py: a restart (after
preemption, or eval of a checkpoint) loads the compiled steps instead of compiling again.

Where: $POLYCOM_COMPILATION_CACHE if set ("off" disables it), else JAX_COMPILATION_CACHE_DIR
if the user set JAX's own variable, else WORKDIR/compilation_cache. The cache is trusted code:
keep it where only you can write (the JAX documentation's warning).
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "POLYCOM_COMPILATION_CACHE"
# Cache every compile: the steps of small models compile in well under JAX's default 1 s.
MIN_COMPILE_SECONDS = 0.0


def cache_dir(workdir: str) -> str | None:
  """The directory the cache uses for this workdir, None when it is off."""
  chosen = os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if chosen == "off":
    return None
  return chosen or os.path.join(workdir, "compilation_cache")


def enable(workdir: str) -> str | None:
  """Points JAX's persistent cache at cache_dir(workdir) (a directory that cannot be created is
  a warning, not an error: the run compiles as without a cache); returns the directory used."""
  path = cache_dir(workdir)
  if path is not None and "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      print(f"warning: no compilation cache ({path}: {e})", flush=True)
      path = None
  if path != jax.config.jax_compilation_cache_dir:
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()          # the cache is opened once; open the new one
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path
