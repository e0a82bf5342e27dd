"""The privacy plan: calibration, the padded batch, a budget that stops early, config errors."""

import math

import ml_collections
import pytest

from dpvl import config as config_lib
from dpvl.privacy import plan as plan_lib


def tiny_config(**privacy):
  c = ml_collections.ConfigDict(dict(
      steps=100, data=dict(size=10_000),
      batch=dict(expected_size=100, microbatch_size=32),
      privacy=dict(enabled=True, clip_norm=1.0, target_epsilon=4.0, noise_multiplier=None,
                   delta=None, accountant="pld", truncation_tolerance=1e-3,
                   seed=None)))
  c.privacy.update(privacy)
  return c


def test_plan_calibrates_and_sizes_the_padded_batch():
  plan = plan_lib.build_plan(tiny_config())
  summary = plan.summary()
  assert summary["epsilon_planned"] <= 4.0 and summary["epsilon_planned"] > 3.9
  assert summary["delta"] == pytest.approx(1e-4)
  assert plan.capacity % 32 == 0 and plan.capacity >= 100
  # Truncation is negligible: its probability is tiny next to delta.
  assert summary["truncation_probability"] <= 1e-3 * plan.delta / (1 + math.exp(4.0))
  for key in ("dataset_size", "expected_batch_size", "sampling_rate", "steps",
              "noise_multiplier", "clip_norm", "delta", "epsilon_planned", "epsilon_rdp",
              "epsilon_pld",
              "accountant", "sampling"):
    assert key in summary
  assert summary["epsilon_rdp"] > summary["epsilon_pld"]


def test_plan_with_sigma_and_budget_stops_early():
  plan = plan_lib.build_plan(tiny_config(noise_multiplier=0.8, target_epsilon=1.0))
  assert plan.steps < plan.configured_steps
  assert plan.epsilon(plan.steps) <= 1.0 < plan.epsilon(plan.steps + 1)


@pytest.mark.parametrize("change, field", [
    (dict(data=dict(size=0)), "data.size"),
    (dict(batch=dict(expected_size=20_000)), "batch.expected_size"),
    (dict(privacy=dict(delta=1e-3)), "privacy.delta"),
    (dict(privacy=dict(target_epsilon=1e-4)), "privacy.target_epsilon"),
    (dict(privacy=dict(accountant="moments")), "privacy.accountant"),
    (dict(batch=dict(microbatch_size=0)), "batch.microbatch_size"),
    (dict(privacy=dict(clip_norm=0.0)), "privacy.clip_norm"),
    (dict(privacy=dict(target_epsilon=None)), "privacy.noise_multiplier"),
])
def test_bad_configs_fail_with_the_field_named(change, field):
  config = tiny_config()
  config.update_from_flattened_dict(
      {f"{k}.{kk}": vv for k, v in change.items() for kk, vv in v.items()})
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    plan_lib.build_plan(config)


def test_missing_field_is_named():
  config = tiny_config()
  del config.privacy["clip_norm"]
  with pytest.raises(config_lib.ConfigError, match=r"config\.privacy\.clip_norm is missing"):
    plan_lib.build_plan(config)


def test_non_private_plan():
  plan = plan_lib.build_plan(tiny_config(enabled=False))
  assert plan.noise_std == 0.0
  assert plan.summary()["epsilon_planned"] is None
