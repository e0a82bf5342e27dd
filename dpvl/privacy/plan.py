"""The privacy plan: sampling, clipping, noise and accounting of a run, fixed before step 0.

`build_plan(config)` reads and checks the config (no data, no device), calibrates the noise
multiplier when only a target epsilon is given, sizes the padded batch so that truncation of a
Poisson batch is negligible, and reports epsilon by both accountants.
"""

import dataclasses
import math
from typing import Sequence

from dpvl import config as config_lib
from dpvl.privacy import accounting
from dpvl.privacy import mechanism as mechanism_lib

SAMPLING = "poisson"  # the sampler the accountants model (`dpvl.privacy.sampling`)


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """Everything that decides the privacy guarantee of a run.

  Neighbouring datasets differ by adding or removing one record. `capacity` is the fixed
  number of padded batch slots per step (`num_microbatches * microbatch_size`); a Poisson batch
  larger than that is truncated to a uniformly random subset of `capacity` records, which the
  accountants account for (see `accounting`). `mechanism` is what is clipped
  (`dpvl.privacy.mechanism`); its declared L2 `sensitivity` under adding or removing one record
  scales the noise: std sigma * Delta.
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

  def segment(self, steps: int) -> accounting.Segment:
    """`steps` steps under this plan."""
    return accounting.Segment(self.dataset_size, self.sampling_rate, self.noise_multiplier,
                              steps, self.capacity, self.groups)

  def segments(self, step: int) -> list[accounting.Segment]:
    """The run's segments once `step` global steps are done."""
    return [*self.done, self.segment(step - self.start)]

  def epsilon(self, step: int, accountant: str | None = None) -> float:
    """Epsilon spent once `step` global steps are done (plan's accountant unless named)."""
    if not self.enabled:
      return math.inf
    return accounting.epsilon(accountant or self.accountant, self.segments(step), self.delta)

  def fingerprint(self) -> dict:
    """The fields a resumed run must keep for the ledger to stay valid."""
    return dict(enabled=self.enabled, dataset_size=self.dataset_size,
                expected_batch_size=self.expected_batch_size, clip_norm=self.clip_norm,
                noise_multiplier=self.noise_multiplier, delta=self.delta,
                accountant=self.accountant, sampling=SAMPLING, capacity=self.capacity,
                mechanism=self.mechanism.name, sensitivity=self.sensitivity, groups=self.groups,
                target_epsilon=self.target_epsilon, configured_steps=self.configured_steps)

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
        clip_norm=self.clip_norm if self.enabled else None,
        mechanism=self.mechanism.name,
        sensitivity=self.sensitivity if self.enabled else None,
        noise_std=self.noise_std,
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
    )


def build_plan(config, done: Sequence[accounting.Segment] = (), start: int = 0) -> PrivacyPlan:
  """Checks the config and makes the plan.

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
  untruncated = accounting.Segment(n, q, sigma or 0.0, steps)
  if sigma is None:
    sigma = accounting.calibrate_noise_multiplier(
        accountant, untruncated, target_epsilon=target, delta=delta)
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
      sensitivity=mechanism.sensitivity(clip_norm, num_micro * micro_size))

  if target is not None:
    # The exact (truncated) accounting decides how many steps fit in the budget. When sigma was
    # calibrated this is all of them, unless truncation cost more than calibration allowed for.
    steps_ok = accounting.max_steps_within(accountant, done, plan.segment(steps - start),
                                           target_epsilon=target, delta=delta)
    check(steps_ok > 0, f"config.privacy.target_epsilon={target} is unreachable: the next "
          "step at this noise multiplier would already spend more.")
    plan = dataclasses.replace(plan, steps=start + steps_ok)
  return dataclasses.replace(plan, done=tuple(done), start=start)
