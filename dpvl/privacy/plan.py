"""The privacy plan: sampling, clipping, noise and accounting of a run, fixed before step 0.

`build_plan(config)` reads and checks the config (no data, no device), calibrates the noise
multiplier when only a target epsilon is given, sizes the padded batch so that truncation of a
Poisson batch is negligible, and reports epsilon by both accountants.

With the DP loss estimate on (`config.privacy.loss_estimate`), every step releases a second
Gaussian mechanism, with noise multiplier sigma_l = noise_ratio * sigma; every segment is
accounted with the effective multiplier sigma_eff = (sigma^-2 + sigma_l^-2)^-1/2, and a target
epsilon is met by calibrating sigma_eff, then sigma = sigma_eff sqrt(1 + 1 / noise_ratio^2).
"""

import dataclasses
import math
from typing import Sequence

from dpvl import config as config_lib
from dpvl.privacy import accounting
from dpvl.privacy import mechanism as mechanism_lib

SAMPLING = "poisson"  # the sampler the accountants model (`dpvl.privacy.sampling`)
SIMULATION_WARNING = (
    "TAN SIMULATION (config.tan): NO PRIVACY GUARANTEE. This run trains at a smaller batch "
    "with the noise scaled down to match the reference run's noise per averaged gradient; it "
    "predicts the reference run's utility, and its parameters must not be released or used "
    "to seed another run.")


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """Everything that decides the privacy guarantee of a run.

  Neighbouring datasets differ by adding or removing one record. `capacity` is the fixed
  number of padded batch slots per step (`num_microbatches * microbatch_size`); a Poisson batch
  larger than that is truncated to a uniformly random subset of `capacity` records, which the
  accountants account for (see `accounting`). `mechanism` is what is clipped
  (`dpvl.privacy.mechanism`); its declared L2 `sensitivity` under adding or removing one record
  scales the noise: std sigma * Delta. With the DP loss estimate, `loss_noise_multiplier`
  (sigma_l) and `loss_bound` (per record) are set, and the accountant sees
  `effective_noise_multiplier`.
  """

  enabled: bool
  dataset_size: int
  expected_batch_size: int
  steps: int               # steps the run will take: the configured steps, or fewer if the
                           # budget (target_epsilon) runs out first
  configured_steps: int
  clip_norm: float
  noise_multiplier: float
  delta: float
  accountant: str
  microbatch_size: int
  num_microbatches: int
  target_epsilon: float | None
  truncation_tolerance: float
  mechanism: mechanism_lib.Mechanism = mechanism_lib.PerExample()
  sensitivity: float = math.inf  # Delta, declared by the mechanism (inf when not private)
  # What the ledger holds from before this plan took over at global step `start`: the steps
  # released by earlier segments (`dpvl.privacy.ledger`), each under its own parameters.
  done: tuple[accounting.Segment, ...] = ()
  start: int = 0
  # The DP loss estimate (`config.privacy.loss_estimate`): None when the run releases none.
  loss_bound: float | None = None             # B_L, the largest loss of one record counted
  loss_noise_multiplier: float | None = None  # sigma_l = noise_ratio * sigma
  # A TAN simulation (`config.tan`, `simulate`): the reference run it stands for
  # (`reference_batch_size`, `reference_noise_multiplier`, `reference_epsilon`); the run
  # itself then has no privacy guarantee. None for a real run.
  simulation: dict | None = None

  @property
  def sampling_rate(self) -> float:
    return self.expected_batch_size / self.dataset_size

  @property
  def groups(self) -> int:
    return self.mechanism.groups

  @property
  def capacity(self) -> int:
    return self.num_microbatches * self.microbatch_size

  @property
  def noise_std(self) -> float:
    """Std of the Gaussian noise added to the clipped sum."""
    return self.noise_multiplier * self.sensitivity if self.enabled else 0.0

  @property
  def loss_estimate(self) -> bool:
    """Whether each step also releases the DP loss estimate."""
    return self.loss_noise_multiplier is not None

  @property
  def loss_sensitivity(self) -> float | None:
    """The bound each unit's loss is clipped to (per example: `loss_bound`; per-batch group:
    `loss_bound` x the expected group size), the clipped loss sum's sensitivity."""
    if not self.loss_estimate:
      return None
    return self.mechanism.loss_sensitivity(self.loss_bound, self.expected_batch_size)

  @property
  def loss_noise_std(self) -> float:
    """Std of the Gaussian noise added to the clipped loss sum (0 without the estimate)."""
    return self.loss_noise_multiplier * self.loss_sensitivity if self.loss_estimate else 0.0

  @property
  def effective_noise_multiplier(self) -> float:
    """The noise multiplier of everything a step releases, the one the accountant uses: sigma,
    or (sigma^-2 + sigma_l^-2)^-1/2 with the loss estimate."""
    if not self.loss_estimate:
      return self.noise_multiplier
    return accounting.combined_noise_multiplier(self.noise_multiplier,
                                                self.loss_noise_multiplier)

  def segment(self, steps: int) -> accounting.Segment:
    """`steps` steps under this plan, at its effective noise multiplier."""
    return accounting.Segment(self.dataset_size, self.sampling_rate,
                              self.effective_noise_multiplier, steps, self.capacity, self.groups)

  def segments(self, step: int) -> list[accounting.Segment]:
    """The run's segments once `step` global steps are done."""
    return [*self.done, self.segment(step - self.start)]

  @property
  def guaranteed(self) -> bool:
    """Whether the run has a privacy guarantee: private and not a TAN simulation."""
    return self.enabled and self.simulation is None

  def epsilon(self, step: int, accountant: str | None = None) -> float:
    """Epsilon spent once `step` global steps are done (plan's accountant unless named);
    inf without a guarantee (a non-private run, a TAN simulation)."""
    if not self.guaranteed:
      return math.inf
    return accounting.epsilon(accountant or self.accountant, self.segments(step), self.delta)

  def fingerprint(self) -> dict:
    """The fields a resumed run must keep for the ledger to stay valid (the loss estimate's
    only when it is on: a run from before it existed resumes as it was)."""
    return dict(enabled=self.enabled, dataset_size=self.dataset_size,
                expected_batch_size=self.expected_batch_size, clip_norm=self.clip_norm,
                noise_multiplier=self.noise_multiplier, delta=self.delta,
                accountant=self.accountant, sampling=SAMPLING, capacity=self.capacity,
                mechanism=self.mechanism.name, sensitivity=self.sensitivity, groups=self.groups,
                target_epsilon=self.target_epsilon, configured_steps=self.configured_steps,
                **(dict(loss_bound=self.loss_bound,
                        loss_noise_multiplier=self.loss_noise_multiplier)
                   if self.loss_estimate else {}),
                **(dict(simulation=self.simulation) if self.simulation else {}))

  def summary(self) -> dict:
    """What `--mode=account` prints: the plan and the epsilon of the whole run."""
    eps_rdp, eps_pld = self.epsilon(self.steps, "rdp"), self.epsilon(self.steps, "pld")
    return dict(
        private=self.enabled,
        dataset_size=self.dataset_size,
        expected_batch_size=self.expected_batch_size,
        sampling_rate=self.sampling_rate,
        steps=self.steps,
        configured_steps=self.configured_steps,
        noise_multiplier=self.noise_multiplier if self.enabled else 0.0,
        loss_noise_multiplier=self.loss_noise_multiplier,
        effective_noise_multiplier=self.effective_noise_multiplier if self.enabled else 0.0,
        clip_norm=self.clip_norm if self.enabled else None,
        mechanism=self.mechanism.name,
        sensitivity=self.sensitivity if self.enabled else None,
        noise_std=self.noise_std,
        loss_bound=self.loss_bound,
        loss_sensitivity=self.loss_sensitivity,
        loss_noise_std=self.loss_noise_std if self.loss_estimate else None,
        groups=self.groups,
        delta=self.delta,
        epsilon_planned=accounting.finite_or_none(eps_pld if self.accountant == "pld" else eps_rdp),
        epsilon_rdp=accounting.finite_or_none(eps_rdp),
        epsilon_pld=accounting.finite_or_none(eps_pld),
        target_epsilon=self.target_epsilon,
        accountant=self.accountant,
        sampling=SAMPLING,
        neighbouring="add_remove_one",
        microbatch_size=self.microbatch_size,
        num_microbatches=self.num_microbatches,
        capacity=self.capacity,
        truncation_probability=accounting.truncation_probability(
            self.dataset_size, self.sampling_rate, self.capacity, self.steps - self.start,
            self.groups),
        **(dict(simulation=dict(self.simulation, guarantee=None, warning=SIMULATION_WARNING))
           if self.simulation else {}),
    )


def _loss_estimate(config, enabled: bool) -> tuple[float, float] | None:
  """(bound, noise_ratio) of `config.privacy.loss_estimate`, or None when it is off (or absent);
  ConfigError naming the field for a bad one."""
  field, check = lambda name: config_lib.get_field(config, name), config_lib.check
  on = config_lib.get_field(config, "privacy.loss_estimate.enabled", False)
  check(isinstance(on, bool),
        f"config.privacy.loss_estimate.enabled must be True or False, got {on!r}.")
  if not on:
    return None
  check(enabled, "config.privacy.loss_estimate.enabled=True needs a private run "
        "(config.privacy.enabled=True); a non-private run has no DP loss to estimate.")
  values = []
  for name in ("bound", "noise_ratio"):
    value = field(f"privacy.loss_estimate.{name}")
    check(isinstance(value, (int, float)) and not isinstance(value, bool)
          and 0 < value < math.inf,
          f"config.privacy.loss_estimate.{name} must be positive and finite, got {value!r}.")
    values.append(float(value))
  return values[0], values[1]


def _split_noise_multiplier(effective: float, ratio: float) -> float:
  """The smallest sigma with combined_noise_multiplier(sigma, ratio * sigma) >= `effective`:
  effective * sqrt(1 + 1 / ratio^2), rounded up to the float where needed."""
  sigma = effective * math.sqrt(1.0 + ratio ** -2.0)
  while accounting.combined_noise_multiplier(sigma, ratio * sigma) < effective:
    sigma = math.nextafter(sigma, math.inf)
  return sigma


def tan_batch_size(config) -> int:
  """`config.tan.batch_size`: B' of a TAN simulation, or 0 (the default) for a real run."""
  b = config_lib.get_field(config, "tan.batch_size", 0) or 0
  config_lib.check(isinstance(b, int) and not isinstance(b, bool) and b >= 0,
                   f"config.tan.batch_size must be a non-negative integer, got {b!r}.")
  return b


def simulate(reference: PrivacyPlan, config, batch: int) -> PrivacyPlan:
  """The TAN simulation (Sander et al., 2023) of the `reference` run at expected batch B' =
  `batch`: the same steps, sigma' = sigma * B' / B, so the noise on the averaged gradient,
  sigma * C / B, is the reference's; the learning rate stays the reference's (the config's).

  `reference` is a private plan (`build_plan` refuses a simulation of a non-private one). The
  simulation claims nothing: `epsilon` is inf and the ledger records it as a simulation
  (`SIMULATION_WARNING`).
  """
  check = config_lib.check
  check(batch < reference.expected_batch_size, f"config.tan.batch_size={batch} must be "
        f"smaller than the reference run's config.batch.expected_size="
        f"{reference.expected_batch_size}.")
  check(not reference.loss_estimate, "config.tan cannot run with "
        "config.privacy.loss_estimate.enabled=True: a simulation releases nothing to estimate.")
  mechanism = mechanism_lib.build_mechanism(config, batch)
  n, steps = reference.dataset_size, reference.steps
  capacity = accounting.min_capacity(n, batch / n, steps, 1e-6, mechanism.groups)
  num_micro, micro = mechanism.layout(capacity, reference.microbatch_size)
  sigma = reference.noise_multiplier * batch / reference.expected_batch_size
  simulation = dict(reference_batch_size=reference.expected_batch_size,
                    reference_noise_multiplier=reference.noise_multiplier,
                    reference_epsilon=accounting.finite_or_none(
                        reference.epsilon(reference.steps)),
                    reference_accountant=reference.accountant)
  return dataclasses.replace(
      reference, expected_batch_size=batch, noise_multiplier=sigma, target_epsilon=None,
      microbatch_size=micro, num_microbatches=num_micro, mechanism=mechanism,
      sensitivity=mechanism.sensitivity(reference.clip_norm, num_micro * micro),
      simulation=simulation)


def build_plan(config, done: Sequence[accounting.Segment] = (), start: int = 0) -> PrivacyPlan:
  """Checks the config and makes the plan (a TAN simulation's with `config.tan.batch_size`).

  Args:
    config: the run's config (`data.size`, `steps`, `batch.*`, `privacy.*`).
    done: a resumed run's earlier ledger segments (see `PrivacyPlan.done`).
    start: the global step at which this plan takes over from them.

  Returns:
    The plan; ConfigError with one sentence naming the field for any config that cannot run.
  """
  field, check = lambda name: config_lib.get_field(config, name), config_lib.check
  n = field("data.size")
  check(isinstance(n, int) and n > 0, f"config.data.size must be a positive integer, got {n!r}.")
  steps = field("steps")
  check(isinstance(steps, int) and steps > 0,
        f"config.steps must be a positive integer, got {steps!r}.")
  check(start < steps, f"config.steps={steps} are already done.")
  batch = field("batch.expected_size")
  check(isinstance(batch, int) and batch > 0,
        f"config.batch.expected_size must be a positive integer, got {batch!r}.")
  check(batch <= n, f"config.batch.expected_size={batch} is larger than the dataset "
        f"(config.data.size={n}).")
  micro = field("batch.microbatch_size")
  check(isinstance(micro, int) and micro > 0,
        f"config.batch.microbatch_size must be a positive integer, got {micro!r}.")

  enabled = bool(field("privacy.enabled"))
  simulated = tan_batch_size(config)  # B' of a TAN simulation of this run, or 0
  check(enabled or not simulated, "config.tan simulates a private run: "
        "config.privacy.enabled must be True.")
  accountant = field("privacy.accountant")
  accounting.ACCOUNTANTS.lookup(accountant)  # an unknown name fails here, listing the choices
  clip_norm = float(field("privacy.clip_norm"))
  check(clip_norm > 0 and math.isfinite(clip_norm),
        f"config.privacy.clip_norm must be positive and finite, got {clip_norm}.")
  delta = field("privacy.delta")
  delta = 1.0 / n if delta is None else float(delta)
  # delta = 1/N is the papers' convention and is allowed; anything larger is refused.
  check(0 < delta <= (1.0 / n) * (1 + 1e-9), f"config.privacy.delta={delta:.3g} must be in "
        f"(0, 1/N] with N={n} (1/N={1.0 / n:.3g}); larger deltas allow leaking a record.")
  target = field("privacy.target_epsilon")
  target = None if target is None else float(target)
  check(target is None or target > 0,
        f"config.privacy.target_epsilon must be positive, got {target}.")
  sigma = field("privacy.noise_multiplier")
  sigma = None if sigma is None else float(sigma)
  tolerance = float(field("privacy.truncation_tolerance"))
  check(0 < tolerance < 1,
        f"config.privacy.truncation_tolerance must be in (0, 1), got {tolerance}.")
  q = batch / n
  mechanism = mechanism_lib.build_mechanism(config, batch)
  estimate = _loss_estimate(config, enabled)
  if estimate is not None:
    mechanism.loss_sensitivity(estimate[0], batch)  # ConfigError if the mechanism has none

  def layout(max_p):
    """(num_microbatches, microbatch_size) for a truncation probability of at most max_p."""
    return mechanism.layout(accounting.min_capacity(n, q, steps, max_p, mechanism.groups), micro)

  if not enabled:
    num_micro, micro_size = layout(1e-6)
    return PrivacyPlan(
        enabled=False, dataset_size=n, expected_batch_size=batch, steps=steps,
        configured_steps=steps, clip_norm=math.inf, noise_multiplier=0.0, delta=delta,
        accountant=accountant, microbatch_size=micro_size, num_microbatches=num_micro,
        target_epsilon=None, truncation_tolerance=1e-6, mechanism=mechanism,
        done=tuple(done), start=start)

  check(sigma is not None or target is not None, "config.privacy.noise_multiplier or "
        "config.privacy.target_epsilon must be set for a private run.")
  check(sigma is None or sigma > 0,
        f"config.privacy.noise_multiplier must be positive, got {sigma}.")
  ratio = None if estimate is None else estimate[1]

  def effective(s: float) -> float:
    return s if ratio is None else accounting.combined_noise_multiplier(s, ratio * s)

  untruncated = accounting.Segment(n, q, effective(sigma) if sigma else 0.0, steps)
  if sigma is None:
    # Calibrated: what the accountant sees (sigma_eff) meets the target, then split.
    sigma_eff = accounting.calibrate_noise_multiplier(
        accountant, untruncated, target_epsilon=target, delta=delta)
    sigma = sigma_eff if ratio is None else _split_noise_multiplier(sigma_eff, ratio)
    eps_ref = target
  else:
    eps_ref = accounting.epsilon(accountant, [untruncated], delta)
    if target is not None:
      eps_ref = min(eps_ref, target)
  # Truncation may cost at most `tolerance * delta` of delta (see accounting's docstring).
  max_p = tolerance * delta / (1.0 + math.exp(min(eps_ref, 700.0)))
  num_micro, micro_size = layout(max_p)
  plan = PrivacyPlan(
      enabled=True, dataset_size=n, expected_batch_size=batch, steps=steps,
      configured_steps=steps, clip_norm=clip_norm, noise_multiplier=sigma, delta=delta,
      accountant=accountant, microbatch_size=micro_size, num_microbatches=num_micro,
      target_epsilon=target, truncation_tolerance=tolerance, mechanism=mechanism,
      sensitivity=mechanism.sensitivity(clip_norm, num_micro * micro_size),
      loss_bound=None if estimate is None else estimate[0],
      loss_noise_multiplier=None if ratio is None else ratio * sigma)

  if target is not None:
    # The exact (truncated) accounting decides how many steps fit in the budget. When sigma was
    # calibrated this is all of them, unless truncation cost more than calibration allowed for.
    # A simulation's budget is its reference run's: that whole run, from step 0.
    spent, first = ((), 0) if simulated else (done, start)
    steps_ok = accounting.max_steps_within(accountant, spent, plan.segment(steps - first),
                                           target_epsilon=target, delta=delta)
    check(steps_ok > 0, f"config.privacy.target_epsilon={target} is unreachable: the next "
          "step at this noise multiplier would already spend more.")
    plan = dataclasses.replace(plan, steps=first + steps_ok)
  if simulated:
    plan = simulate(plan, config, simulated)
  return dataclasses.replace(plan, done=tuple(done), start=start)
