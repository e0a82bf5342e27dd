"""The DP mechanism of a run: what is clipped, and the four things that must agree with it.

A mechanism owns
  * its batch layout: how a step's padded capacity splits into micro-batches (`layout`);
  * the arrangement of a step's Poisson selection into those slots (`arrange`);
  * its private gradient: clip, sum, noise once, normalise (`gradient`);
  * its declared L2 sensitivity under adding or removing one record (`sensitivity`), which
    scales the noise: std sigma * Delta, so the accountant's sigma means what it means for
    DP-SGD;
  * for the DP loss estimate, the bound each unit's loss is clipped to, which is also the
    clipped loss sum's sensitivity (`loss_sensitivity`).

`PerExample` is DP-SGD on a per-example loss (Delta = C). `PerBatch` and `LogitDP` are for the
batch-coupled contrastive loss of a dual encoder; their bounds are derived in
`dpvl.privacy.contrastive`. A mechanism takes what it needs from the objective by name
(`takes`): a per-example loss or the two towers, and refuses an objective without it.
"""

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax

from dpvl import config as config_lib
from dpvl import registry
from dpvl.privacy import clipping
from dpvl.privacy import contrastive
from dpvl.privacy import dpsgd
from dpvl.privacy import ghost
from dpvl.privacy import sampling

# (params, batch, mask, rngs, noise_key, *, clip_norm, noise_std, expected_batch_size, enabled,
#  shardings) -> (gradient estimate, metrics); shardings: the parameters' (or None)
GradientFn = Callable[..., Any]


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """The part every mechanism shares: one group, micro-batches of the configured size."""

  name: ClassVar[str]
  takes: ClassVar[str]  # the objective's attribute the gradient is built from

  @property
  def groups(self) -> int:
    """The number of independently clipped groups a step's records are hashed into."""
    return 1

  def layout(self, capacity: int, microbatch_size: int) -> tuple[int, int]:
    """(num_microbatches, microbatch_size) holding at least `capacity` slots.

    Args:
      capacity: the slots a step needs (the plan sizes it so truncation is negligible).
      microbatch_size: the configured micro-batch size (speed and memory only).
    """
    return _ceil_div(capacity, microbatch_size), microbatch_size

  def arrange(self, selection: sampling.Selection, *, salt: int, step: int,
              microbatch_size: int) -> sampling.Selection:
    """A step's selection laid out in the slots of `layout` (here: as drawn).

    Args:
      selection: the step's Poisson selection (`PoissonSampler.select`).
      salt: the segment's secret group salt (`secrets.RunSecrets.group_salt`); unused here.
      step: the global step; unused here.
      microbatch_size: the plan's micro-batch size; unused here.

    Returns:
      The selection, its slots in micro-batch order.
    """
    del salt, step, microbatch_size
    return selection

  def sensitivity(self, clip_norm: float, capacity: int) -> float:
    """Delta: the L2 norm by which one record can move the summed gradient."""
    raise NotImplementedError

  def loss_sensitivity(self, bound: float, expected_batch_size: int) -> float:
    """The bound each unit's loss is clipped to for the DP loss estimate: by how much one record
    can move the clipped loss sum. `bound` is per record; ConfigError if there is none.

    Args:
      bound: `config.privacy.loss_estimate.bound`, the largest loss of one record counted.
      expected_batch_size: q * N.
    """
    raise NotImplementedError

  def gradient(self, objective) -> GradientFn:
    """The private gradient for `objective`; ConfigError if it lacks what this mechanism takes."""
    part = getattr(objective, self.takes, None)
    if part is None:
      raise config_lib.ConfigError(self._mismatch(objective.name))
    return self._gradient(part)

  def _gradient(self, part) -> GradientFn:
    raise NotImplementedError

  def report(self, objective, params, microbatch_size: int = 1) -> str | None:
    """A line for the run's log on how the clipped sums are computed, or None.

    Args:
      objective: the run's objective.
      params: its parameters (or their shapes).
      microbatch_size: the slots of a micro-batch (a group's, for per-batch clipping).
    """
    del objective, params, microbatch_size
    return None

  def _mismatch(self, objective_name: str) -> str:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PerExample(Mechanism):
  """DP-SGD: each example's gradient clipped to C; Delta = C."""

  name: ClassVar[str] = "per_example"
  takes: ClassVar[str] = "per_example_loss"
  clipping: str = "vmap"  # a key of `clipping.STRATEGIES`: speed and memory, never Delta

  def sensitivity(self, clip_norm: float, capacity: int) -> float:
    del capacity
    return clip_norm

  def loss_sensitivity(self, bound: float, expected_batch_size: int) -> float:
    """An example's loss clipped to [0, bound]: one record moves the sum by at most bound."""
    del expected_batch_size
    return bound

  def _gradient(self, per_example_loss) -> GradientFn:
    return functools.partial(dpsgd.private_gradient, per_example_loss,
                             clipping_strategy=self.clipping)

  def report(self, objective, params, microbatch_size: int = 1) -> str | None:
    """Ghost clipping's plan for `objective`: the parameters each layer rule covers and every
    parameter that takes the exact fallback."""
    del microbatch_size
    if self.clipping != "ghost":
      return None
    rng = jax.eval_shape(lambda: jax.random.key(0))
    return ghost.discover(objective.per_example_loss, params, objective.example_spec,
                          rng).describe(params)

  def _mismatch(self, objective_name: str) -> str:
    return (f"objective {objective_name!r} has a batch-coupled loss that per-example clipping "
            f"does not make private; set config.privacy.mechanism to one of "
            f"{sorted(CONTRASTIVE)}.")


@dataclasses.dataclass(frozen=True)
class _Contrastive(Mechanism):
  takes: ClassVar[str] = "dual_encoder"

  def _mismatch(self, objective_name: str) -> str:
    return (f"config.privacy.mechanism={self.name!r} is for contrastive objectives; objective "
            f"{objective_name!r} has a per-example loss: use 'per_example'.")


@dataclasses.dataclass(frozen=True)
class PerBatch(_Contrastive):
  """Per-batch clipping (Huang et al.): records hashed into `num_groups` groups per step, each
  group's gradient clipped to C as a unit; Delta = 2C. Micro-batch g holds group g, its slots
  rounded up to a multiple of `slot_multiple`."""

  name: ClassVar[str] = "per_batch"
  num_groups: int = 1
  slot_multiple: int = 8
  clipping: str = "vmap"  # a key of `clipping.STRATEGIES`: speed and memory, never Delta

  @property
  def groups(self) -> int:
    return self.num_groups

  def layout(self, capacity: int, microbatch_size: int) -> tuple[int, int]:
    del microbatch_size  # one micro-batch per group
    per_group = _ceil_div(capacity // self.num_groups, self.slot_multiple) * self.slot_multiple
    return self.num_groups, per_group

  def arrange(self, selection: sampling.Selection, *, salt: int, step: int,
              microbatch_size: int) -> sampling.Selection:
    """Micro-batch g holds the records that hash to group g at `step` under the secret salt.

    Args:
      selection: the step's Poisson selection (`PoissonSampler.select`).
      salt: the segment's secret group salt (`secrets.RunSecrets.group_salt`).
      step: the global step.
      microbatch_size: the plan's micro-batch size: the slots of each group.

    Returns:
      `contrastive.hash_groups` of the selection: num_groups * microbatch_size slots, records
      beyond a full group dropped and counted in `truncated`.
    """
    return contrastive.hash_groups(selection, salt, step, self.num_groups, microbatch_size)

  def sensitivity(self, clip_norm: float, capacity: int) -> float:
    del capacity
    return contrastive.per_batch_sensitivity(clip_norm)

  def loss_sensitivity(self, bound: float, expected_batch_size: int) -> float:
    """A group's summed loss clipped to [0, bound x the expected group size]: a record moves
    one group's clipped loss (a scalar in that range) by at most that much."""
    return bound * expected_batch_size / self.num_groups

  def _gradient(self, dual_encoder) -> GradientFn:
    return functools.partial(contrastive.per_batch_gradient, dual_encoder,
                             clipping_strategy=self.clipping)

  def report(self, objective, params, microbatch_size: int = 1) -> str | None:
    """Ghost clipping's plan for a group of `microbatch_size` slots, as `PerExample.report`."""
    if self.clipping != "ghost":
      return None
    group = jax.tree.map(lambda x: jax.ShapeDtypeStruct((microbatch_size, *x.shape), x.dtype),
                         dict(objective.example_spec))
    mask = jax.ShapeDtypeStruct((microbatch_size,), bool)
    loss = functools.partial(contrastive.group_unit_loss, objective.dual_encoder)
    return ghost.discover(loss, params, (group, mask)).describe(params)


@dataclasses.dataclass(frozen=True)
class LogitDP(_Contrastive):
  """Logit-DP (Kong et al.): every pairwise similarity gradient clipped to C; Delta grows with
  1 / temperature and saturates in the batch capacity. `pair_norms` ("exact" or "bound") is a
  speed/memory choice that never changes Delta."""

  name: ClassVar[str] = "logit_dp"
  temperature: float = 1.0
  pair_norms: str = "exact"

  def sensitivity(self, clip_norm: float, capacity: int) -> float:
    return contrastive.logit_dp_sensitivity(clip_norm, self.temperature, capacity)

  def loss_sensitivity(self, bound: float, expected_batch_size: int) -> float:
    """None: a pair's loss depends on every pair of the batch (one record moves them all)."""
    raise config_lib.ConfigError(
        "config.privacy.loss_estimate.enabled=True is not supported with "
        "config.privacy.mechanism='logit_dp': each pair's loss depends on the whole batch, so "
        "no clipped unit loss bounds one record's influence; use 'per_batch' or disable it.")

  def _gradient(self, dual_encoder) -> GradientFn:
    return functools.partial(contrastive.logit_dp_gradient, dual_encoder,
                             pair_norm_method=self.pair_norms)


def _clipping(config) -> str:
  name = config_lib.get_field(config, "privacy.clipping", "vmap")
  config_lib.check(name in clipping.STRATEGIES, f"config.privacy.clipping={name!r} is unknown; "
                   f"choose one of {sorted(clipping.STRATEGIES)}.")
  return name


def _per_example(config, expected_batch_size: int) -> PerExample:
  del expected_batch_size
  return PerExample(clipping=_clipping(config))


def _per_batch(config, expected_batch_size: int) -> PerBatch:
  group_size = config_lib.get_field(config, "privacy.group_size")
  config_lib.check(isinstance(group_size, int) and group_size > 1,
                   f"config.privacy.group_size must be an integer > 1, got {group_size!r}.")
  multiple = config_lib.get_field(config, "batch.slot_multiple", 8)
  config_lib.check(isinstance(multiple, int) and multiple > 0,
                   f"config.batch.slot_multiple must be a positive integer, got {multiple!r}.")
  return PerBatch(num_groups=max(1, round(expected_batch_size / group_size)),
                  slot_multiple=multiple, clipping=_clipping(config))


def _logit_dp(config, expected_batch_size: int) -> LogitDP:
  del expected_batch_size
  temperature = config_lib.get_field(config, "model.temperature")
  config_lib.check(isinstance(temperature, (int, float)) and temperature > 0,
                   f"config.model.temperature must be positive, got {temperature!r}.")
  how = config_lib.get_field(config, "privacy.pair_norms", "exact")
  config_lib.check(how in contrastive.PAIR_NORMS, f"config.privacy.pair_norms={how!r} is "
                   f"unknown; choose one of {contrastive.PAIR_NORMS}.")
  return LogitDP(temperature=float(temperature), pair_norms=how)


MECHANISMS = registry.Registry("config.privacy.mechanism", {
    PerExample.name: _per_example,
    PerBatch.name: _per_batch,
    LogitDP.name: _logit_dp,
})
CONTRASTIVE = (PerBatch.name, LogitDP.name)


def build_mechanism(config, expected_batch_size: int) -> Mechanism:
  """The mechanism named by `config.privacy.mechanism` (default "per_example"), checked.

  Args:
    config: the run's config.
    expected_batch_size: q * N (per-batch clipping hashes into about this / group_size groups).

  Returns:
    The mechanism; ConfigError with one sentence naming the field if the config is wrong.
  """
  name = config_lib.get_field(config, "privacy.mechanism", PerExample.name)
  return MECHANISMS[name](config, expected_batch_size)
