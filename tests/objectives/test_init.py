"""Building an objective (dpvl/objectives/__init__.py): the small configs build, and every
model field a module would reject at init fails at build with a ConfigError naming it."""

import pytest

from configs import vip_tiny
from dpvl import objectives
from tests.helpers import raises_config_error


def _small_vip_config():
  c = vip_tiny.get_config()
  c.data.image_size = 16
  c.model.encoder.update(dict(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.decoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  return c


@pytest.fixture
def small_configs(dpcap_config, dpclip_config):
  """Objective name -> builder of its small config."""
  return dict(dpcap=dpcap_config, dpclip=dpclip_config, vip_mae=_small_vip_config)


@pytest.mark.parametrize("objective", ["dpcap", "dpclip", "vip_mae"])
def test_the_small_configs_build(objective, small_configs):
  assert objectives.build_objective(small_configs[objective]()).name == objective


@pytest.mark.parametrize("objective, field, value, match", [
    ("dpcap", "data.image_size", 20,
     r"config.data.image_size=20 is not a multiple of config.model.encoder.patch_size=8"),
    ("dpcap", "model.encoder.patch_size", 0, "patch_size must be a positive integer, got 0"),
    ("dpcap", "model.encoder.num_heads", 3,
     r"config.model.encoder.width=32 is not divisible by config.model.encoder.num_heads=3"),
    ("dpcap", "model.encoder.num_heads", 0, "num_heads must be a positive integer, got 0"),
    ("dpcap", "model.encoder.posemb", "rope", r"posemb='rope' is unknown"),
    ("dpcap", "model.encoder.width", 30, r"encoder.width=30 must be divisible by 4"),
    ("dpcap", "model.encoder.nm_heads", 2, "has no field 'nm_heads'; did you mean 'num_heads'"),
    ("dpcap", "model.decoder.num_heads", 5, r"config.model.decoder.width=32 is not divisible"),
    ("dpcap", "model.decoder.max_len", 8, r"decoder.max_len cannot be set"),
    ("dpcap", "model.dtype", "flaot32", r"config.model.dtype='flaot32' is not a dtype"),
    ("dpclip", "model.temperature", 0.0, "config.model.temperature must be positive, got 0.0"),
    ("dpclip", "model.text.num_heads", 3, r"config.model.text.width=32 is not divisible"),
    ("dpclip", "model.embed_dim", 0, "config.model.embed_dim must be a positive integer"),
    ("vip_mae", "model.mask_ratio", 1.0, r"config.model.mask_ratio must be in \[0, 1\), got 1.0"),
    ("vip_mae", "model.decoder.width", 30, r"decoder.width=30 must be divisible by 4"),
    ("vip_mae", "model.decoder.heads", 2, "decoder has no field 'heads'"),
])
def test_model_fields_fail_at_build_not_at_init(objective, field, value, match, small_configs):
  config = small_configs[objective]()
  *parents, name = field.split(".")
  section = config
  for parent in parents:
    section = section[parent]
  with section.ignore_type():
    section[name] = value
  with raises_config_error(match):
    objectives.build_objective(config)


def test_a_missing_model_field_is_named(dpcap_config):
  config = dpcap_config()
  del config.model.encoder["mlp_dim"]
  with raises_config_error("config.model.encoder.mlp_dim is missing"):
    objectives.build_objective(config)
