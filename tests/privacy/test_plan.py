"""The privacy plan: calibration, the padded batch, a budget that stops early, config errors."""

import math

import dp_accounting
from dp_accounting import pld
import ml_collections
import pytest

from dpvl import config as config_lib
from dpvl.privacy import accounting
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


ESTIMATE = dict(enabled=True, bound=10.0, noise_ratio=2.0)


def test_the_loss_estimate_is_accounted_at_the_combined_noise_multiplier():
  config = lambda **privacy: dict(tiny_config(noise_multiplier=0.8, target_epsilon=None,
                                              **privacy), steps=40)
  on = plan_lib.build_plan(ml_collections.ConfigDict(config(loss_estimate=ESTIMATE)))
  off = plan_lib.build_plan(ml_collections.ConfigDict(config()))
  assert (on.noise_multiplier, on.loss_noise_multiplier) == (0.8, 1.6)
  sigma_eff = accounting.combined_noise_multiplier(0.8, 1.6)
  assert on.effective_noise_multiplier == sigma_eff and on.segment(5).noise_multiplier == sigma_eff
  assert on.noise_std == off.noise_std == 0.8 and on.loss_noise_std == 1.6 * 10.0
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      on.sampling_rate, dp_accounting.GaussianDpEvent(sigma_eff)), 40)
  assert on.epsilon(40) == pytest.approx(
      pld.PLDAccountant().compose(event).get_epsilon(on.delta), rel=1e-6)
  assert on.epsilon(40) > off.epsilon(40) * 1.1
  summary = on.summary()
  assert (summary["noise_multiplier"], summary["loss_noise_multiplier"],
          summary["effective_noise_multiplier"]) == (0.8, 1.6, sigma_eff)
  # Turning the estimate on changes the plan: a resume needs --force_resume.
  assert on.fingerprint() != off.fingerprint()
  assert set(off.fingerprint()) == set(on.fingerprint()) - {"loss_bound", "loss_noise_multiplier"}


def test_calibration_with_the_loss_estimate_meets_the_target():
  config = tiny_config(accountant="rdp", target_epsilon=2.0, loss_estimate=ESTIMATE)
  config.steps = 20
  on = plan_lib.build_plan(config)
  del config.privacy["loss_estimate"]  # a config without the field: no estimate
  off = plan_lib.build_plan(config)
  assert off.loss_noise_multiplier is None
  # The target is met by both releases together: sigma_eff is the calibrated sigma without.
  assert on.effective_noise_multiplier == pytest.approx(off.noise_multiplier, rel=1e-12)
  assert on.effective_noise_multiplier >= off.noise_multiplier
  assert on.noise_multiplier == pytest.approx(off.noise_multiplier * math.sqrt(1 + 1 / 4))
  assert on.steps == 20 and 1.95 < on.epsilon(20) <= 2.0


@pytest.mark.parametrize("change, field", [
    (dict(enabled="yes"), "privacy.loss_estimate.enabled"),
    (dict(bound=0.0), "privacy.loss_estimate.bound"),
    (dict(noise_ratio=-1.0), "privacy.loss_estimate.noise_ratio"),
])
def test_bad_loss_estimates_fail_with_the_field_named(change, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    plan_lib.build_plan(tiny_config(loss_estimate=dict(ESTIMATE, **change)))


def test_the_loss_estimate_is_refused_where_no_unit_loss_bounds_a_record():
  with pytest.raises(config_lib.ConfigError, match=r"loss_estimate.*private run"):
    plan_lib.build_plan(tiny_config(enabled=False, loss_estimate=ESTIMATE))
  config = tiny_config(noise_multiplier=1.0, loss_estimate=ESTIMATE, mechanism="logit_dp")
  config.model = dict(temperature=0.5)
  with pytest.raises(config_lib.ConfigError, match=r"loss_estimate.*logit_dp"):
    plan_lib.build_plan(config)
  # per_batch: a hash group is the unit, its summed loss bounded by bound x the group size.
  config = tiny_config(noise_multiplier=1.0, loss_estimate=ESTIMATE, mechanism="per_batch",
                       group_size=25)
  plan = plan_lib.build_plan(config)
  assert plan.groups == 4 and plan.loss_sensitivity == 10.0 * 25


def test_a_tan_simulation_matches_the_reference_noise_per_averaged_gradient():
  reference = plan_lib.build_plan(tiny_config(target_epsilon=4.0))
  config = tiny_config(target_epsilon=4.0)
  config.tan = dict(batch_size=25)
  plan = plan_lib.build_plan(config)
  assert plan.expected_batch_size == 25 and plan.steps == reference.steps
  assert plan.noise_multiplier == pytest.approx(reference.noise_multiplier * 25 / 100)
  # The noise std of the averaged gradient, sigma C / B, is the reference run's.
  assert plan.noise_std / 25 == pytest.approx(reference.noise_std / 100)
  assert plan.capacity < reference.capacity and plan.capacity >= 25
  # It claims nothing, says so, and remembers the run it stands for.
  assert not plan.guaranteed and plan.epsilon(plan.steps) == math.inf
  summary = plan.summary()
  assert summary["epsilon_planned"] is None and summary["epsilon_pld"] is None
  assert "NO PRIVACY GUARANTEE" in summary["simulation"]["warning"]
  assert summary["simulation"]["reference_batch_size"] == 100
  assert summary["simulation"]["reference_epsilon"] == pytest.approx(
      reference.epsilon(reference.steps))
  assert plan.fingerprint()["simulation"] == plan.simulation  # a resume must keep it
  assert "simulation" not in reference.fingerprint()


@pytest.mark.parametrize("change, fragment", [
    (dict(tan=dict(batch_size=100)), "smaller than"),
    (dict(tan=dict(batch_size=-1)), "tan.batch_size"),
    (dict(tan=dict(batch_size=10), privacy=dict(enabled=False)), "privacy.enabled"),
    (dict(tan=dict(batch_size=10), privacy=dict(loss_estimate=ESTIMATE)), "loss_estimate"),
])
def test_bad_tan_simulations_are_refused(change, fragment):
  config = tiny_config(noise_multiplier=1.0)
  config.update(change)
  with pytest.raises(config_lib.ConfigError, match=fragment):
    plan_lib.build_plan(config)
