"""Epsilon against dp-accounting and the papers' runs; calibration; truncation; the plan."""

import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import ml_collections
import pytest

from dpvl import config as config_lib
from dpvl.privacy import accounting
from dpvl.privacy import plan as plan_lib

N = 233_000_000
# (expected batch, sigma, steps, delta, epsilon RDP, epsilon PLD) of the ViP (Yu et al., ICLR 2024)
# and DP-Cap (Sander et al., ICML 2024) LAION runs, by dp-accounting 0.6.0 under Poisson sampling.
TABLE = {
    "vip_laion": (98_304, 0.48, 6_000, 1 / (2 * N), 7.996, 6.831),
    "dpcap_eps8": (1_310_720, 0.728, 5_708, 1 / N, 8.073, 7.360),
    "dpcap_eps2": (1_310_720, 1.18, 2_854, 1 / N, 1.998, 1.783),
}


@pytest.mark.parametrize("row", sorted(TABLE))
def test_epsilon_matches_dp_accounting_and_the_papers(row):
  batch, sigma, steps, delta, want_rdp, want_pld = TABLE[row]
  segment = accounting.Segment(N, batch / N, sigma, steps)
  got_rdp = accounting.epsilon_rdp([segment], delta)
  got_pld = accounting.epsilon_pld([segment], delta)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(batch / N, dp_accounting.GaussianDpEvent(sigma)), steps)
  assert got_rdp == pytest.approx(rdp.RdpAccountant().compose(event).get_epsilon(delta), 1e-9)
  assert got_pld == pytest.approx(pld.PLDAccountant().compose(event).get_epsilon(delta), 1e-9)
  assert round(got_rdp, 3) == pytest.approx(want_rdp, abs=1e-3)
  assert round(got_pld, 3) == pytest.approx(want_pld, abs=1e-3)


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_truncation_is_paid_for_in_delta(name):
  n, q, sigma, steps, delta = 10_000, 0.01, 1.0, 200, 1e-5
  plain = accounting.epsilon(name, [accounting.Segment(n, q, sigma, steps)], delta)
  roomy = accounting.min_capacity(n, q, steps, 1e-12)
  assert accounting.truncation_probability(n, q, roomy, steps) <= 1e-12
  cheap = accounting.epsilon(name, [accounting.Segment(n, q, sigma, steps, roomy)], delta)
  assert plain <= cheap <= plain * 1.001
  # p of order delta: costs visibly more.
  tight = accounting.min_capacity(n, q, steps, 2e-6)
  costly = accounting.epsilon(name, [accounting.Segment(n, q, sigma, steps, tight)], delta)
  assert costly > plain * 1.01
  # Far too small a capacity: the truncation probability exceeds delta, no epsilon is valid.
  assert accounting.epsilon(name, [accounting.Segment(n, q, sigma, steps, 110)], delta) == math.inf


def test_min_capacity_meets_the_probability():
  n, q, steps = 50_000, 0.005, 1_000
  cap = accounting.min_capacity(n, q, steps, 1e-12)
  assert accounting.truncation_probability(n, q, cap, steps) <= 1e-12
  assert accounting.truncation_probability(n, q, cap - 1, steps) > 1e-12


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_calibration_reaches_the_target_from_below(name):
  segment = accounting.Segment(N, 1_310_720 / N, 0.0, 5_708)
  sigma = accounting.calibrate_noise_multiplier(name, segment, target_epsilon=8.0, delta=1 / N)
  eps = accounting.epsilon(name, [segment.replace(noise_multiplier=sigma)], 1 / N)
  assert eps <= 8.0
  assert accounting.epsilon(name, [segment.replace(noise_multiplier=sigma - 2e-3)], 1 / N) > 8.0
  want = dict(pld=0.7078, rdp=0.7303)[name]  # dp-accounting 0.6.0 at DP-Cap's run
  assert sigma == pytest.approx(want, abs=2e-3)


def test_max_steps_within_budget():
  segment = accounting.Segment(10_000, 0.01, 1.0, 1_000)
  k = accounting.max_steps_within("rdp", [], segment, target_epsilon=2.0, delta=1e-5)
  assert 0 < k < 1_000
  assert accounting.epsilon_rdp([segment.replace(steps=k)], 1e-5) <= 2.0
  assert accounting.epsilon_rdp([segment.replace(steps=k + 1)], 1e-5) > 2.0


@pytest.mark.parametrize("name, library", [("pld", pld.PLDAccountant), ("rdp", rdp.RdpAccountant)])
def test_segments_compose(name, library):
  a = accounting.Segment(10_000, 0.01, 1.0, 300)
  b = accounting.Segment(10_000, 0.02, 2.0, 100)
  both = accounting.epsilon(name, [a, b, a.replace(steps=7)], 1e-5)
  assert both > accounting.epsilon(name, [a], 1e-5)
  assert both > accounting.epsilon(name, [b], 1e-5)
  # The same number as the library's accountant on the composed event (PLD: from cached
  # one-step distributions; it must stay exactly the library's figure).
  event = accounting.dp_event([a, b, a.replace(steps=7)])
  assert both == library().compose(event).get_epsilon(1e-5)


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
