"""What every entry point does around its work: quiet logs, multi-process start, clean errors."""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags, logging

from polycom_jax import distributed
from polycom_jax.config_errors import ConfigError, RunError


def run(body: Callable[[], None]):
  """Runs body after jax.distributed start-up; a bad config or input exits 2 and a failed run
  (checkpoint I/O, non-finite training, a step that does not compile) exits 1, each with one
  line instead of a traceback."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save step at INFO
  try:
    distributed.initialize()
    body()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
