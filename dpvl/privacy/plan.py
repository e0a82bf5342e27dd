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
from dpvl.privacy import contrastive

SAMPLINGS = ("poisson",)
# per_example: DP-SGD on a per-example loss; the others are for batch-coupled contrastive
# losses (`dpvl.privacy.contrastive`).
MECHANISMS = ("per_example", *contrastive.MECHANISMS)


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """Everything that decides the privacy guarantee of a run.

  Neighbouring datasets differ by adding or removing one record. `capacity` is the fixed
  number of padded batch slots per step (`num_microbatches * microbatch_size`); a Poisson batch
  larger than that is truncated to a uniformly random subset of `capacity` records, which the
  accountants account for (see `accounting`). `mechanism` names what is clipped; its declared
  L2 `sensitivity` under adding or removing one record scales the noise: std sigma * Delta.
  For "per_batch", every micro-batch is one hash group (`groups` of them).
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
  sampling: str
  microbatch_size: int
  num_microbatches: int
  target_epsilon: float | None
  truncation_tolerance: float
  mechanism: str = "per_example"
  sensitivity: float = math.inf  # Delta: C for per_example (see `contrastive` for the others)
  groups: int = 1
  # What the ledger holds from before this plan took over at global step `start`: the steps
  # released by earlier segments (`dpvl.privacy.ledger`), each under its own parameters.
  done: tuple[accounting.Segment, ...] = ()
  start: int = 0

  @property
  def sampling_rate(self) -> float:
    return self.expected_batch_size / self.dataset_size

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
                accountant=self.accountant, sampling=self.sampling, capacity=self.capacity,
                mechanism=self.mechanism, sensitivity=self.sensitivity, groups=self.groups,
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
        mechanism=self.mechanism,
        sensitivity=self.sensitivity if self.enabled else None,
        noise_std=self.noise_std,
        groups=self.groups,
        delta=self.delta,
        epsilon_planned=accounting.finite_or_none(eps_pld if self.accountant == "pld" else eps_rdp),
        epsilon_rdp=accounting.finite_or_none(eps_rdp),
        epsilon_pld=accounting.finite_or_none(eps_pld),
        target_epsilon=self.target_epsilon,
        accountant=self.accountant,
        sampling=self.sampling,
        neighbouring="add_remove_one",
        microbatch_size=self.microbatch_size,
        num_microbatches=self.num_microbatches,
        capacity=self.capacity,
        truncation_probability=accounting.truncation_probability(
            self.dataset_size, self.sampling_rate, self.capacity, self.steps - self.start,
            self.groups),
    )


def build_plan(config, done: Sequence[accounting.Segment] = (), start: int = 0) -> PrivacyPlan:
  """Checks the config and makes the plan; a resumed run's plan takes over at global step
  `start` after the ledger's earlier segments `done` (see `PrivacyPlan.done`).

  Raises ConfigError with one sentence naming the field for any config that cannot run.
  """
  n = config_lib.get_field(config, "data.size")
  config_lib.check(isinstance(n, int) and n > 0, f"config.data.size must be a positive integer, got {n!r}.")
  steps = config_lib.get_field(config, "steps")
  config_lib.check(isinstance(steps, int) and steps > 0,
         f"config.steps must be a positive integer, got {steps!r}.")
  config_lib.check(start < steps, f"config.steps={steps} are already done.")
  batch = config_lib.get_field(config, "batch.expected_size")
  config_lib.check(isinstance(batch, int) and batch > 0,
         f"config.batch.expected_size must be a positive integer, got {batch!r}.")
  config_lib.check(batch <= n, f"config.batch.expected_size={batch} is larger than the dataset "
         f"(config.data.size={n}).")
  micro = config_lib.get_field(config, "batch.microbatch_size")
  config_lib.check(isinstance(micro, int) and micro > 0,
         f"config.batch.microbatch_size must be a positive integer, got {micro!r}.")

  enabled = bool(config_lib.get_field(config, "privacy.enabled"))
  sampling = config_lib.get_field(config, "privacy.sampling")
  config_lib.check(sampling in SAMPLINGS,
         f"config.privacy.sampling={sampling!r} is unknown; choose one of {SAMPLINGS}.")
  accountant = config_lib.get_field(config, "privacy.accountant")
  config_lib.check(accountant in accounting.ACCOUNTANTS, f"config.privacy.accountant={accountant!r} is "
         f"unknown; choose one of {accounting.ACCOUNTANTS}.")
  clip_norm = float(config_lib.get_field(config, "privacy.clip_norm"))
  config_lib.check(clip_norm > 0 and math.isfinite(clip_norm),
         f"config.privacy.clip_norm must be positive and finite, got {clip_norm}.")
  delta = config_lib.get_field(config, "privacy.delta")
  delta = 1.0 / n if delta is None else float(delta)
  # delta = 1/N is the papers' convention and is allowed; anything larger is refused.
  config_lib.check(0 < delta <= (1.0 / n) * (1 + 1e-9), f"config.privacy.delta={delta:.3g} must be in "
         f"(0, 1/N] with N={n} (1/N={1.0 / n:.3g}); larger deltas allow leaking a record.")
  target = config_lib.get_field(config, "privacy.target_epsilon")
  target = None if target is None else float(target)
  config_lib.check(target is None or target > 0,
         f"config.privacy.target_epsilon must be positive, got {target}.")
  sigma = config_lib.get_field(config, "privacy.noise_multiplier")
  sigma = None if sigma is None else float(sigma)
  tolerance = float(config_lib.get_field(config, "privacy.truncation_tolerance"))
  config_lib.check(0 < tolerance < 1,
         f"config.privacy.truncation_tolerance must be in (0, 1), got {tolerance}.")
  q = batch / n
  mechanism = config_lib.get_field(config, "privacy.mechanism", "per_example")
  config_lib.check(mechanism in MECHANISMS,
         f"config.privacy.mechanism={mechanism!r} is unknown; choose one of {MECHANISMS}.")
  groups = 1
  if mechanism == "per_batch":
    group_size = config_lib.get_field(config, "privacy.group_size")
    config_lib.check(isinstance(group_size, int) and group_size > 1,
           f"config.privacy.group_size must be an integer > 1, got {group_size!r}.")
    groups = max(1, round(batch / group_size))
  # per_batch: a group's slots are rounded up to a multiple of this (the data axis' size).
  multiple = config_lib.get_field(config, "batch.slot_multiple", 8)
  config_lib.check(isinstance(multiple, int) and multiple > 0,
         f"config.batch.slot_multiple must be a positive integer, got {multiple!r}.")

  def layout(max_p):
    """(num_microbatches, microbatch_size) for a truncation probability of at most max_p."""
    cap = accounting.min_capacity(n, q, steps, max_p, groups)
    if mechanism == "per_batch":  # one micro-batch per group
      return groups, -(-(cap // groups) // multiple) * multiple
    return -(-cap // micro), micro

  if not enabled:
    num_micro, micro_size = layout(1e-6)
    return PrivacyPlan(
        enabled=False, dataset_size=n, expected_batch_size=batch, steps=steps,
        configured_steps=steps, clip_norm=math.inf, noise_multiplier=0.0, delta=delta,
        accountant=accountant, sampling=sampling, microbatch_size=micro_size,
        num_microbatches=num_micro, target_epsilon=None, truncation_tolerance=1e-6,
        mechanism=mechanism, groups=groups, done=tuple(done), start=start)

  config_lib.check(sigma is not None or target is not None, "config.privacy.noise_multiplier or "
         "config.privacy.target_epsilon must be set for a private run.")
  config_lib.check(sigma is None or sigma > 0,
         f"config.privacy.noise_multiplier must be positive, got {sigma}.")
  temperature = None
  if mechanism == "logit_dp":
    temperature = config_lib.get_field(config, "model.temperature")
    config_lib.check(isinstance(temperature, (int, float)) and temperature > 0,
           f"config.model.temperature must be positive, got {temperature!r}.")
  untruncated = accounting.Segment(n, q, sigma or 0.0, steps)
  if sigma is None:
    try:
      sigma = accounting.calibrate_noise_multiplier(
          accountant, untruncated, target_epsilon=target, delta=delta)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    eps_ref = target
  else:
    eps_ref = accounting.epsilon(accountant, [untruncated], delta)
    if target is not None:
      eps_ref = min(eps_ref, target)
  # Truncation may cost at most `tolerance * delta` of delta (see accounting's docstring).
  max_p = tolerance * delta / (1.0 + math.exp(min(eps_ref, 700.0)))
  num_micro, micro_size = layout(max_p)
  if mechanism == "per_batch":
    sensitivity = contrastive.per_batch_sensitivity(clip_norm)
  elif mechanism == "logit_dp":
    sensitivity = contrastive.logit_dp_sensitivity(clip_norm, temperature,
                                                   num_micro * micro_size)
  else:
    sensitivity = clip_norm
  plan = PrivacyPlan(
      enabled=True, dataset_size=n, expected_batch_size=batch, steps=steps,
      configured_steps=steps, clip_norm=clip_norm, noise_multiplier=sigma, delta=delta,
      accountant=accountant, sampling=sampling, microbatch_size=micro_size,
      num_microbatches=num_micro, target_epsilon=target, truncation_tolerance=tolerance,
      mechanism=mechanism, sensitivity=sensitivity, groups=groups)

  if target is not None:
    # The exact (truncated) accounting decides how many steps fit in the budget. When sigma was
    # calibrated this is all of them, unless truncation cost more than calibration allowed for.
    steps_ok = accounting.max_steps_within(accountant, done, plan.segment(steps - start),
                                           target_epsilon=target, delta=delta)
    config_lib.check(steps_ok > 0, f"config.privacy.target_epsilon={target} is unreachable: the next "
           "step at this noise multiplier would already spend more.")
    plan = dataclasses.replace(plan, steps=start + steps_ok)
  return dataclasses.replace(plan, done=tuple(done), start=start)
