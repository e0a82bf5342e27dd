"""The config layer: reading fields of an `ml_collections` config and the one error for a bad one.

Every check of a config raises `ConfigError` with one sentence naming the field, before any
data is read or any device is touched.
"""

from typing import Any


class ConfigError(ValueError):
  """A config that cannot describe a valid run; the message names the field."""


def get_field(config, dotted: str, default: Any = ...) -> Any:
  """`config.<dotted>`, or a ConfigError naming the missing field (unless a default is given).

  >>> import ml_collections
  >>> c = ml_collections.ConfigDict(dict(batch=dict(expected_size=256)))
  >>> get_field(c, "batch.expected_size")
  256
  >>> get_field(c, "batch.microbatch_size", 64)
  64
  >>> get_field(c, "batch.microbatch_size")
  Traceback (most recent call last):
  ...
  dpvl.config.ConfigError: config.batch.microbatch_size is missing.
  """
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      if default is not ...:
        return default
      raise ConfigError(f"config.{dotted} is missing.") from None
  return node


def check(ok: bool, message: str) -> None:
  """Raises ConfigError(message) unless `ok`."""
  if not ok:
    raise ConfigError(message)
