"""The two error types the entry points turn into one line instead of a traceback."""


class ConfigError(ValueError):
  """A config value, path or checkpoint that cannot work; the message names the field. Raised
  before anything compiles; the entry points exit 2."""


class RunError(RuntimeError):
  """A run that failed for a reason its message explains (checkpoint I/O, non-finite training,
  a step that does not compile or fit); the entry points exit 1."""


def require(ok: bool, field: str, message: str):
  """Raises ConfigError(f"{field} {message}") unless ok."""
  if not ok:
    raise ConfigError(f"{field} {message}")
