"""The config layer: reading fields of an `ml_collections` config and the one error for a bad one.

Every check of a config raises `ConfigError` with one sentence naming the field, before any
data is read or any device is touched.
"""

import dataclasses
from typing import Any


class ConfigError(ValueError):
  """A config that cannot describe a valid run; the message names the field."""


def get_field(config, dotted: str, default: Any = ...) -> Any:
  """`config.<dotted>`, or a ConfigError naming the missing field (unless a default is given).

  Args:
    config: an `ml_collections.ConfigDict` (or nested mapping).
    dotted: the field's path, e.g. `"batch.expected_size"`.
    default: returned if any part of the path is missing; omit it to require the field.

  Returns:
    The field's value, or `default` if it is missing.

  Raises:
    ConfigError: if the field is missing and no default is given.

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


@dataclasses.dataclass(frozen=True)
class Training:
  """The loop's own settings, checked; none of them changes the privacy guarantee."""

  seed: int                 # parameter init and per-example randomness (public)
  log_every: int            # steps between metrics rows (and ledger writes)
  checkpoint_every: int     # steps between checkpoints
  init_from: str            # workdir of a non-private run to start from ("" for none)
  max_skip_fraction: float  # stop when far more records than this cannot be used
  data_workers: int         # processes decoding records (0: threads only)
  # Log the metrics computed on the private data without noise (`private_data_diagnostics`);
  # False for runs whose logs leave the trust boundary.
  log_private_diagnostics: bool = True


def training(config) -> Training:
  """Reads and checks the loop's fields of `config`; ConfigError naming the field if wrong."""
  field = lambda name, *default: get_field(config, name, *default)
  t = Training(seed=field("seed"), log_every=field("log_every"),
               checkpoint_every=field("checkpoint_every"), init_from=field("init_from", "") or "",
               max_skip_fraction=float(field("data.max_skip_fraction", 0.05)),
               data_workers=field("data.workers", 0),
               log_private_diagnostics=field("log_private_diagnostics", True))
  check(isinstance(t.seed, int), f"config.seed must be an integer, got {t.seed!r}.")
  for name in ("log_every", "checkpoint_every"):
    value = getattr(t, name)
    check(isinstance(value, int) and value > 0,
          f"config.{name} must be a positive integer, got {value!r}.")
  check(0 <= t.max_skip_fraction <= 1,
        f"config.data.max_skip_fraction must be in [0, 1], got {t.max_skip_fraction}.")
  check(isinstance(t.data_workers, int) and t.data_workers >= 0,
        f"config.data.workers must be an integer >= 0, got {t.data_workers!r}.")
  check(isinstance(t.log_private_diagnostics, bool), "config.log_private_diagnostics must be "
        f"True or False, got {t.log_private_diagnostics!r}.")
  return t
