"""Epsilon against dp-accounting and the papers' runs; calibration; truncation."""

import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import pytest

from dpvl.privacy import accounting

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


def test_two_gaussians_on_the_same_data_are_one_at_the_combined_multiplier():
  # The gradient (sigma) and the DP loss estimate (sigma_l = 3 sigma), each with noise std its
  # multiplier times its own sensitivity, against one Gaussian at sigma_eff: no sampling.
  sigma, sigma_l, delta = 0.8, 2.4, 1e-5
  sigma_eff = accounting.combined_noise_multiplier(sigma, sigma_l)
  assert sigma_eff == pytest.approx((sigma ** -2 + sigma_l ** -2) ** -0.5)
  both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma),
                                        dp_accounting.GaussianDpEvent(sigma_l)])
  one = dp_accounting.GaussianDpEvent(sigma_eff)
  eps = lambda event: pld.PLDAccountant(value_discretization_interval=1e-3).compose(
      event).get_epsilon(delta)
  assert eps(both) == pytest.approx(eps(one), rel=1e-6)
  assert eps(both) > eps(dp_accounting.GaussianDpEvent(sigma)) * 1.01
