"""The one error type for bad configuration or input, raised before anything compiles."""


class ConfigError(ValueError):
  """A config value, path or checkpoint that cannot work; the message names the field."""


def require(ok: bool, field: str, message: str):
  """Raises ConfigError(f"{field} {message}") unless ok."""
  if not ok:
    raise ConfigError(f"{field} {message}")
