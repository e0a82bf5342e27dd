"""Small helpers the tests share: the config error they expect, and configs built from dicts."""

import types

import ml_collections
import pytest

from dpvl import config as config_lib


def raises_config_error(match: str):
  """`pytest.raises` for the ConfigError whose message matches `match`."""
  return pytest.raises(config_lib.ConfigError, match=match)


def data_config(**fields) -> ml_collections.ConfigDict:
  """A `config.data` block with `fields`."""
  return ml_collections.ConfigDict(fields)


def namespace(fields: dict) -> types.SimpleNamespace:
  """An object whose attributes are `fields` (a config block read by attribute)."""
  return types.SimpleNamespace(**fields)
