"""The optimizer's settings and schedules (`config.optimizer`)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpvl import config as config_lib
from dpvl import optim


def _config(**optimizer):
  fields = dict(learning_rate=1e-3, b1=0.9, b2=0.95, weight_decay=0.01, warmup_steps=10,
                schedule="cosine")
  fields.update(optimizer)
  return ml_collections.ConfigDict(dict(optimizer=fields))


@pytest.mark.parametrize("name, middle, end", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0),
                                               ("constant", 1.0, 1.0)])
def test_each_schedule_warms_up_then_decays_as_named(name, middle, end):
  schedule = optim.SCHEDULES[name](1e-3, 10, 110)
  rates = np.array([float(schedule(t)) for t in (0, 5, 10, 60, 110)]) / 1e-3
  np.testing.assert_allclose(rates, [0.0, 0.5, 1.0, middle, end], atol=1e-6)


def test_settings_are_checked_before_any_compute():
  assert optim.settings(_config()) == optim.Settings(1e-3, 0.9, 0.95, 0.01, 10, "cosine")
  for bad, field in ((dict(schedule="cosin"), "optimizer.schedule.*cosine"),
                     (dict(learning_rate=0.0), "optimizer.learning_rate"),
                     (dict(b2=1.0), "optimizer.b2"), (dict(warmup_steps=-1), "warmup_steps")):
    with pytest.raises(config_lib.ConfigError, match=field):
      optim.settings(_config(**bad))


def test_no_weight_decay_on_biases_and_norms():
  params = dict(kernel=jnp.ones((2, 2)), bias=jnp.ones(2))
  tx = optim.make_optimizer(optim.settings(_config(learning_rate=0.1, warmup_steps=0,
                                                   schedule="constant")), 10)
  zero = dict(kernel=jnp.zeros((2, 2)), bias=jnp.zeros(2))
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates["bias"]).max()) == 0.0  # no gradient, no decay
  assert float(jnp.abs(updates["kernel"]).max()) > 0.0  # decayed towards zero


def test_vip_schedule_is_the_minimum_of_the_warm_up_and_a_cosine_over_the_whole_horizon():
  schedule = optim.SCHEDULES["warmup_min_cosine"](1.0, 1_000, 6_000)
  rate = lambda t: float(schedule(t))
  assert rate(0) == pytest.approx(1e-3) and rate(499) == pytest.approx(0.5)
  assert rate(999) == pytest.approx(0.5 * (1 + np.cos(np.pi * 999 / 6_000)))  # below the ramp
  assert rate(3_000) == pytest.approx(0.5, abs=1e-6) and rate(6_000) == pytest.approx(0.0)


def test_a_schedule_over_a_longer_horizon_stops_early():
  # DP-Cap: warm-up 2,000, cosine over 10,000 steps, stopped at 5,708: lr ends at ~0.56 peak.
  s = optim.settings(_config(learning_rate=5.12e-4, warmup_steps=2_000, schedule_steps=10_000))
  schedule = optim.SCHEDULES[s.schedule](s.learning_rate, s.warmup_steps, s.schedule_steps)
  assert float(schedule(5_708)) / 5.12e-4 == pytest.approx(0.557, abs=1e-3)
  with pytest.raises(config_lib.ConfigError, match="optimizer.schedule_steps"):
    optim.settings(_config(schedule_steps=0))


def test_weight_decay_on_all_parameters_when_asked():
  params = dict(kernel=jnp.ones((2, 2)), bias=jnp.ones(2))
  tx = optim.make_optimizer(optim.settings(_config(learning_rate=0.1, warmup_steps=0,
                                                   schedule="constant", decay="all")), 10)
  zero = dict(kernel=jnp.zeros((2, 2)), bias=jnp.zeros(2))
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates["bias"]).min()) > 0.0
  with pytest.raises(config_lib.ConfigError, match="optimizer.decay"):
    optim.settings(_config(decay="some"))
