"""What every entry point does around its work: quiet logs, multi-process start, clean errors."""

from __future__ import annotations

import ast
import sys
from typing import Callable

from absl import flags, logging

from polycom_jax import distributed
from polycom_jax.config_errors import ConfigError, RunError


def _one_line(e: BaseException) -> str:
  text = str(e)
  if text[:1] in "'\"" and text[-1:] == text[:1]:   # ConfigDict's KeyError text, quoted again
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return " ".join(lines)[:600] or type(e).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run(main, flags_parser=cli.parse_flags)) with one line for a
  typo'd flag, a bad value, or a --config.a.b override of a field the config lacks; exit 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flags.Error, and what config overrides raise
    kind = f"{type(e).__name__}: " if isinstance(e, (SyntaxError, OSError)) else ""
    print(f"error: {kind}{_one_line(e)} (--helpshort lists the flags)", file=sys.stderr)
    sys.exit(2)


def run(body: Callable[[], None], config=None):
  """Runs body after jax.distributed start-up; a bad config or input exits 2 and a failed run
  (checkpoint I/O, non-finite training, a step that does not compile) exits 1, each with one
  line instead of a traceback. config: the entry point's config flag, loaded first so that a
  missing file or a syntax error in it is one line too."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save step at INFO
  if config is not None:
    try:
      list(config.value.keys())    # loads the config file (ml_collections defers errors)
    except Exception as e:  # noqa: BLE001 - the file's own errors, whatever they are
      cause = e.__cause__ or e
      print(f"error: --config={flags.FLAGS[config.name].config_filename}: "
            f"{type(cause).__name__}: {_one_line(cause)}", file=sys.stderr)
      sys.exit(2)
  try:
    distributed.initialize()
    body()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
