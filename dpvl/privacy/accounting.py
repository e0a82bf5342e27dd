"""Privacy accounting for DP-SGD with (truncated) Poisson sampling, on top of dp-accounting.

The mechanism dpvl runs at every step: each of the N records joins the batch independently with
probability q; if more than `capacity` records join, a uniformly random subset of `capacity` of
them is kept (the padded batch shape is fixed); every kept record's gradient is clipped to L2
norm C, the clipped gradients are summed, and N(0, (sigma C)^2 I) is added once. Neighbouring
datasets differ by adding or removing one record.

Both accountants (PLD, the default, and RDP, the cross-check) account the untruncated Poisson
subsampled Gaussian M and pay for the truncation with delta: if the run truncates any batch with
probability at most p (over all steps, for any dataset of at most N + 1 records), the truncated
mechanism M' is within total variation p of M on every dataset, so for every event S
  P[M'(D) in S] <= P[M(D) in S] + p <= e^eps P[M(D') in S] + delta_M + p
                <= e^eps P[M'(D') in S] + delta_M + (1 + e^eps) p,
i.e. an (eps, delta_M) guarantee of M gives M' the guarantee (eps, delta_M + (1 + e^eps) p).
The reported epsilon is that of M at delta_M = delta - (1 + e^eps) p: a guarantee at exactly
the configured delta for what actually runs. The plan sizes the capacity so that p is
negligible (at most `truncation_tolerance * delta / (1 + e^eps)`), where this costs nothing
visible. (dp-accounting's `TruncatedSubsampledGaussianDpEvent` accounts M' exactly, but is
orders of magnitude slower at these sizes.)

A step that also releases the DP loss estimate (`config.privacy.loss_estimate`) runs two
Gaussian mechanisms on the same Poisson sample: the gradient sum (sensitivity Delta, noise std
sigma Delta) and the clipped loss sum (sensitivity B, noise std sigma_l B). Scaled by their
noise stds, the pair is one Gaussian mechanism with unit noise whose L2 sensitivity is at most
sqrt(sigma^-2 + sigma_l^-2): the step is accounted as one subsampled Gaussian with noise
multiplier sigma_eff = (sigma^-2 + sigma_l^-2)^-1/2 (`combined_noise_multiplier`), the
multiplier every segment of such a run carries.
"""

import dataclasses
import functools
import logging
import math
from typing import Sequence

import dp_accounting
from dp_accounting import rdp
from dp_accounting.pld import privacy_loss_distribution
from scipy import stats

from dpvl import config as config_lib
from dpvl import registry


def _drop_unconverged_order_warnings(record: logging.LogRecord) -> bool:
  # dp-accounting's RDP accountant warns when a fractional order near 1 fails to converge at
  # small sigma and then leaves that order out: the epsilon it reports is still a valid bound
  # (a minimum over the other orders), so the warning is noise to a dpvl user.
  return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_drop_unconverged_order_warnings)

# Search range for the noise multiplier during calibration.
_MIN_SIGMA, _MAX_SIGMA = 0.05, 500.0


def truncation_probability(dataset_size: int, sampling_rate: float, capacity: int,
                           steps: int, groups: int = 1) -> float:
  """Upper bound on P(some step's Poisson batch overflows its slots) over `steps` steps.

  Uses N + 1 records, the larger of two add/remove-neighbouring datasets. With `groups` > 1 the
  slots are `groups` blocks of `capacity // groups` (per-batch clipping's hash groups): a
  record joins block g with probability q / groups (sampled with probability q, hashed to g
  with probability 1 / groups), so a block's size is Binomial(N + 1, q / groups), and the
  bound is the union over blocks. A batch larger than `capacity` overflows some block, so this
  also bounds the sampler's own truncation.

  Args:
    dataset_size: N, the records of the dataset.
    sampling_rate: q, the probability that a record joins a step's batch.
    capacity: the batch slots of one step (all blocks together).
    steps: the steps the bound spans.
    groups: the hash-group blocks the slots are split into (1: one block).

  Returns:
    The bound, in [0, 1]: the union over steps and blocks of P(Binomial(N + 1, q / groups)
    > capacity // groups); 0 for no steps.

  >>> f"{truncation_probability(10_000, 0.01, capacity=150, steps=1_000):.2e}"
  '1.08e-03'
  """
  if steps == 0:
    return 0.0
  per_step = groups * float(stats.binom.sf(capacity // groups, dataset_size + 1,
                                           sampling_rate / groups))
  return min(1.0, steps * per_step)


def min_capacity(dataset_size: int, sampling_rate: float, steps: int,
                 max_probability: float, groups: int = 1) -> int:
  """Smallest capacity (a multiple of `groups`) whose `truncation_probability` is at most
  `max_probability`.

  Args:
    dataset_size: N, the records of the dataset.
    sampling_rate: q, the probability that a record joins a step's batch.
    steps: the steps of the run the bound spans.
    max_probability: the largest tolerated probability that any step truncates.
    groups: the hash-group blocks the slots are split into (1: one block).

  Returns:
    The capacity: a multiple of `groups`, from (floor(N q / groups) + 1) * groups (the search
    takes floor(N q / groups) per block to be too small) to (N + 1) * groups (never truncates).

  >>> min_capacity(10_000, 0.01, steps=1_000, max_probability=1e-9)  # 100 expected records
  177
  """
  lo = int(math.floor(dataset_size * sampling_rate / groups))  # too small (unless q is 0 or 1)
  hi = dataset_size + 1                                        # never truncates
  while hi - lo > 1:
    mid = (lo + hi) // 2
    p = truncation_probability(dataset_size, sampling_rate, mid * groups, steps, groups)
    if p <= max_probability:
      hi = mid
    else:
      lo = mid
  return hi * groups


def combined_noise_multiplier(*noise_multipliers: float) -> float:
  """(sum_i sigma_i^-2)^-1/2: the noise multiplier of Gaussian mechanisms released together on
  the same data, each with noise std sigma_i times its own sensitivity (module docstring).

  >>> round(combined_noise_multiplier(1.0, 10.0), 6)  # the gradient, and the loss at ratio 10
  0.995037
  """
  return sum(s ** -2.0 for s in noise_multipliers) ** -0.5


@dataclasses.dataclass(frozen=True)
class Segment:
  """`steps` DP-SGD steps run with one set of privacy parameters.

  A run is a list of segments: one, unless a resume was forced to change the plan.
  `noise_multiplier` is the one the accountant uses: the effective noise multiplier of
  everything a step releases (the gradient's, combined with the loss estimate's when a run
  releases one: `combined_noise_multiplier`). `capacity=None` means untruncated Poisson
  sampling; `groups` > 1 splits the capacity into hash-group blocks (see
  `truncation_probability`).
  """

  dataset_size: int
  sampling_rate: float
  noise_multiplier: float
  steps: int
  capacity: int | None = None
  groups: int = 1

  def replace(self, **changes) -> "Segment":
    return dataclasses.replace(self, **changes)


def dp_event(segments: Sequence[Segment]) -> dp_accounting.DpEvent:
  """The DP event of a run without truncation (the mechanism M of the module docstring)."""
  return dp_accounting.ComposedDpEvent([
      dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
          s.sampling_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)), s.steps)
      for s in segments if s.steps > 0])


def run_truncation_probability(segments: Sequence[Segment]) -> float:
  """Upper bound on P(the run truncates any batch), by the union bound over steps."""
  return min(1.0, sum(
      truncation_probability(s.dataset_size, s.sampling_rate, s.capacity, s.steps, s.groups)
      for s in segments if s.capacity is not None))


def finite_or_none(x: float) -> float | None:
  """An epsilon as JSON holds it: None for infinity (a non-private run)."""
  return x if math.isfinite(x) else None


_PLD_DISCRETIZATION = 1e-4  # PLDAccountant's default value discretization interval


@functools.lru_cache(maxsize=64)
def _step_pld(sampling_rate: float, noise_multiplier: float):
  """The privacy loss distribution of one Poisson-subsampled Gaussian step, as
  `dp_accounting.pld.PLDAccountant` builds it. Building it is most of an epsilon's cost and the
  ledger asks for one at every release, so it is built once per (q, sigma)."""
  return privacy_loss_distribution.from_gaussian_mechanism(
      standard_deviation=noise_multiplier, value_discretization_interval=_PLD_DISCRETIZATION,
      sampling_prob=sampling_rate)


def _pld_epsilon_fn(segments: Sequence[Segment]):
  """delta -> epsilon of `segments` by PLD: what `PLDAccountant().compose(dp_event(segments))`
  computes (the same distributions composed in the same order), from cached one-step PLDs."""
  composed = privacy_loss_distribution.identity(_PLD_DISCRETIZATION)
  for s in segments:
    if s.steps == 0 or s.sampling_rate == 0:
      continue
    if s.noise_multiplier == 0:
      return lambda _: math.inf
    composed = composed.compose(_step_pld(s.sampling_rate, s.noise_multiplier)
                                .self_compose(s.steps))
  return composed.get_epsilon_for_delta


def _rdp_epsilon_fn(segments: Sequence[Segment]):
  """delta -> epsilon of `segments` by Renyi DP (`dp_accounting.rdp.RdpAccountant`)."""
  return rdp.RdpAccountant().compose(dp_event(segments)).get_epsilon


# name -> (segments -> (delta -> epsilon)): PLD is tight, RDP the looser cross-check.
ACCOUNTANTS = registry.Registry("config.privacy.accountant",
                                {"pld": _pld_epsilon_fn, "rdp": _rdp_epsilon_fn})


def epsilon(accountant: str, segments: Sequence[Segment], delta: float) -> float:
  """Epsilon of the run by the named accountant ("pld" or "rdp"), truncation paid in delta.

  Args:
    accountant: "pld" (tight) or "rdp" (the cross-check).
    segments: the run's segments, in order.
    delta: the run's delta, truncation's share included (see the module docstring).

  Returns:
    Epsilon of the truncated mechanism at `delta`: 0.0 if no step is run, inf when no
    epsilon fits (truncation spends all of delta, or a segment adds no noise).

  Raises:
    ConfigError: for an unknown accountant (the registry's error, listing the choices).

  >>> run = [Segment(dataset_size=10_000, sampling_rate=0.01, noise_multiplier=1.0, steps=1_000)]
  >>> round(epsilon("pld", run, delta=1e-4), 3), round(epsilon("rdp", run, delta=1e-4), 3)
  (1.513, 1.755)
  >>> later = Segment(10_000, 0.01, noise_multiplier=2.0, steps=500)  # a forced resume's segment
  >>> round(epsilon("pld", [*run, later], delta=1e-4), 3)
  1.568
  """
  return _epsilon(accountant, tuple(segments), delta)


@functools.lru_cache(maxsize=4096)  # a pure function: the ledger and the plan ask again
def _epsilon(accountant: str, segments: tuple[Segment, ...], delta: float) -> float:
  epsilon_fn = ACCOUNTANTS[accountant]  # an unknown name fails here, listing the choices
  if not any(s.steps for s in segments):
    return 0.0
  epsilon_at = epsilon_fn(segments)
  eps_m = lambda delta_m: float(epsilon_at(delta_m))
  p = run_truncation_probability(segments)
  eps = eps_m(delta)
  if p == 0.0:
    return eps
  for _ in range(20):  # fixed point of eps = eps_M(delta - (1 + e^eps) p); p is tiny
    delta_m = delta - (1.0 + math.exp(min(eps, 700.0))) * p
    if delta_m <= 0:
      return math.inf
    new_eps = eps_m(delta_m)
    if new_eps <= eps:
      # M is (new_eps, delta_m)-DP, so M' is (new_eps, delta_m + (1 + e^new_eps) p), and
      # that delta is at most delta because new_eps <= eps.
      return new_eps
    eps = new_eps
  return math.inf


def epsilon_pld(segments: Sequence[Segment], delta: float) -> float:
  """Epsilon by privacy loss distributions (tight)."""
  return epsilon("pld", segments, delta)


def epsilon_rdp(segments: Sequence[Segment], delta: float) -> float:
  """Epsilon by Renyi DP (looser; the cross-check)."""
  return epsilon("rdp", segments, delta)


@functools.lru_cache(maxsize=32)  # a pure function that a resume asks again
def calibrate_noise_multiplier(accountant: str, segment: Segment, *, target_epsilon: float,
                               delta: float, tol: float = 1e-3) -> float:
  """Smallest noise multiplier (to `tol`, rounded up) at which `segment` spends at most
  `target_epsilon`; the segment's own noise multiplier is ignored.

  Args:
    accountant: "pld" or "rdp".
    segment: the steps to calibrate for; its `noise_multiplier` is ignored.
    target_epsilon: the epsilon the segment may spend, at most.
    delta: the run's delta.
    tol: the bisection's absolute tolerance on the noise multiplier.

  Returns:
    The noise multiplier, in [0.05, 500]: at most `tol` above the smallest that meets the
    target (0.05 if that already meets it).

  Raises:
    ConfigError: when the target is out of reach in the segment's steps (even noise multiplier
      500 spends more).

  >>> run = Segment(dataset_size=10_000, sampling_rate=0.01, noise_multiplier=0.0, steps=1_000)
  >>> round(calibrate_noise_multiplier("rdp", run, target_epsilon=2.0, delta=1e-4), 3)
  0.945
  """
  def eps_at(sigma):
    return epsilon(accountant, [segment.replace(noise_multiplier=sigma)], delta)

  if eps_at(_MAX_SIGMA) > target_epsilon:
    raise config_lib.ConfigError(
        f"config.privacy.target_epsilon={target_epsilon} is unreachable in {segment.steps} "
        f"steps at sampling rate {segment.sampling_rate:.3g} and delta {delta:.3g}: even noise "
        f"multiplier {_MAX_SIGMA} spends more; lower the steps or the batch size, or raise "
        "the target.")
  # Bracket: RDP's sigma is cheap to find and is an upper bound on PLD's (PLD is tighter);
  # slow accountants are only evaluated near the answer.
  hi = _MAX_SIGMA
  if accountant != "rdp":
    sigma_rdp = calibrate_noise_multiplier("rdp", segment, target_epsilon=target_epsilon,
                                           delta=delta, tol=tol)
    if eps_at(sigma_rdp) <= target_epsilon:
      hi = sigma_rdp
  lo = max(_MIN_SIGMA, hi / 1.25) if hi < _MAX_SIGMA else _MIN_SIGMA
  while lo > _MIN_SIGMA and eps_at(lo) <= target_epsilon:
    hi, lo = lo, max(_MIN_SIGMA, lo / 1.25)
  if lo == _MIN_SIGMA and eps_at(lo) <= target_epsilon:
    return lo
  while hi - lo > tol:  # invariant: eps_at(lo) > target >= eps_at(hi)
    mid = math.sqrt(lo * hi) if hi / lo > 2 else (lo + hi) / 2
    if eps_at(mid) <= target_epsilon:
      hi = mid
    else:
      lo = mid
  return hi


def max_steps_within(accountant: str, done: Sequence[Segment], segment: Segment, *,
                     target_epsilon: float, delta: float) -> int:
  """Largest k <= segment.steps such that `done` plus k steps of `segment` spend at most
  `target_epsilon`.

  Args:
    accountant: "pld" or "rdp".
    done: the segments already run (their epsilon counts).
    segment: the next segment; at most its `steps` are counted.
    target_epsilon: the epsilon the whole run may spend, at most.
    delta: the run's delta.

  Returns:
    k in [0, segment.steps]; 0 also when `done` alone spends more than `target_epsilon`.

  >>> run = Segment(dataset_size=10_000, sampling_rate=0.01, noise_multiplier=1.0, steps=1_000)
  >>> max_steps_within("rdp", [], run, target_epsilon=1.5, delta=1e-4)
  690
  """
  def eps_after(k):
    return epsilon(accountant, [*done, segment.replace(steps=k)], delta)

  if eps_after(segment.steps) <= target_epsilon:
    return segment.steps
  lo, hi = 0, segment.steps  # eps_after(lo) <= target < eps_after(hi), or lo == 0
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if eps_after(mid) <= target_epsilon:
      lo = mid
    else:
      hi = mid
  return lo
