"""Name -> builder registries, each read from one config field, with one error for a bad name.

Objectives, evaluators, data sources, tokenizers and privacy mechanisms are all chosen by a
name in the config. A `Registry` maps those names to builders; a builder is a callable, or a
"package.module:function" string imported on first use, so that registering a builder costs
no import (an objective's module imports its model).
"""

import importlib
from typing import Any, Callable, Iterator, Mapping

from dpvl import config as config_lib

Builder = Callable[..., Any]


class Registry(Mapping[str, Builder]):
  """A read-only mapping from names to builders, looked up by the config field `field`.

  Looking up a name that is not registered raises `ConfigError` naming the field and the
  choices; `in`, iteration and `len` never import anything.

  >>> r = Registry("config.f", {"root": "math:sqrt", "double": lambda x: 2 * x})
  >>> r["root"](9.0), r["double"](3)
  (3.0, 6)
  >>> sorted(r), "root" in r, "cube" in r
  (['double', 'root'], True, False)
  >>> r["cube"]
  Traceback (most recent call last):
  ...
  dpvl.config.ConfigError: config.f='cube' is unknown; choose one of ['double', 'root'].
  >>> r.lookup("cube", field="config.evals.x.f")
  Traceback (most recent call last):
  ...
  dpvl.config.ConfigError: config.evals.x.f='cube' is unknown; choose one of ['double', 'root'].
  """

  def __init__(self, field: str, entries: Mapping[str, Builder | str]):
    """Registers `entries`.

    Args:
      field: the dotted config field whose value names an entry, e.g. "config.objective";
        it starts the message of an unknown name.
      entries: name -> builder: a callable, or "package.module:function" (imported on the
        first lookup of that name).
    """
    for name, entry in entries.items():
      if isinstance(entry, str) and entry.count(":") != 1:
        raise ValueError(f"registry entry {name!r} of {field}: {entry!r} is not "
                         f"'package.module:function'.")
      if not isinstance(entry, str) and not callable(entry):
        raise TypeError(f"registry entry {name!r} of {field} is neither callable nor a "
                        f"'package.module:function' string: {entry!r}.")
    self.field = field
    self._entries = dict(entries)

  def unknown(self, name: Any, field: str | None = None) -> config_lib.ConfigError:
    """The error for a name that is not registered (the field defaults to `self.field`)."""
    return config_lib.ConfigError(f"{field or self.field}={name!r} is unknown; choose one of "
                                  f"{sorted(self._entries)}.")

  def lookup(self, name: Any, field: str | None = None) -> Builder:
    """The builder registered as `name`, imported if given lazily.

    Args:
      name: the registered name.
      field: the config field that named it, if not `self.field` (e.g. one of many evaluators).

    Returns:
      The builder; ConfigError naming the field and listing the choices if there is none.
    """
    if name not in self:
      raise self.unknown(name, field)
    entry = self._entries[name]
    if isinstance(entry, str):
      module, function = entry.split(":")
      entry = getattr(importlib.import_module(module), function)
      self._entries[name] = entry
    return entry

  def __getitem__(self, name: Any) -> Builder:
    return self.lookup(name)

  def __contains__(self, name: object) -> bool:
    try:
      return name in self._entries
    except TypeError:  # unhashable: no name
      return False

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def get(self, name: Any, default: Any = None) -> Any:
    """The builder of `name`, or `default` if none is registered."""
    return self.lookup(name) if name in self else default

  def __repr__(self) -> str:
    return f"Registry({self.field!r}, {sorted(self._entries)})"
