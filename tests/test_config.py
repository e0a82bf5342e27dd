"""The config helpers (dpvl/config.py): the loop's typed settings."""

import ml_collections
import pytest

from dpvl import config as config_lib


def test_the_loop_settings_are_typed_and_checked():
  c = ml_collections.ConfigDict(dict(seed=0, log_every=10, checkpoint_every=50, init_from="",
                                     data=dict(max_skip_fraction=0.05)))
  t = config_lib.training(c)
  assert (t.seed, t.log_every, t.checkpoint_every, t.data_workers) == (0, 10, 50, 0)
  c.log_every = 0
  with pytest.raises(config_lib.ConfigError, match="config.log_every"):
    config_lib.training(c)
