"""The optimizer: AdamW with a warm-up and a decay schedule, from `config.optimizer`.

The optimizer only sees the private gradient estimate, so nothing here touches privacy: its
settings are checked before any compute and may change freely between runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dpvl import config as config_lib
from dpvl import registry


def _cosine(peak: float, warmup: int, total: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=0.0)


def _linear(peak: float, warmup: int, total: int) -> optax.Schedule:
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak, warmup),
      optax.linear_schedule(peak, 0.0, max(total - warmup, 1))], [warmup])


def _constant(peak: float, warmup: int, total: int) -> optax.Schedule:
  del total
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                               optax.constant_schedule(peak)], [warmup])


def _warmup_min_cosine(peak: float, warmup: int, total: int) -> optax.Schedule:
  """peak * min((t + 1) / warmup, (1 + cos(pi t / total)) / 2): ViP's official schedule, the
  cosine over the whole horizon from step 0 (not from the end of the warm-up)."""
  def schedule(t):
    ramp = (t + 1.0) / max(warmup, 1)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, total) / total))
    return peak * jnp.minimum(ramp, cosine)
  return schedule


# name -> (peak learning rate, warm-up steps, total steps) -> schedule
SCHEDULES = registry.Registry("config.optimizer.schedule", {
    "cosine": _cosine, "linear": _linear, "constant": _constant,
    "warmup_min_cosine": _warmup_min_cosine})

# name -> params -> the pytree of bools of the parameters weight decay applies to
DECAY_MASKS = registry.Registry("config.optimizer.decay", {
    "matrices": lambda params: jax.tree.map(lambda p: p.ndim > 1, params),  # not biases, norms
    "all": lambda params: jax.tree.map(lambda p: True, params),  # the ViP and DP-Cap recipes
})


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.optimizer`, checked."""

  learning_rate: float
  b1: float
  b2: float
  weight_decay: float
  warmup_steps: int
  schedule: str = "cosine"
  schedule_steps: int | None = None  # steps the schedule spans; None: the run's configured steps
  decay: str = "matrices"  # a key of DECAY_MASKS


def settings(config) -> Settings:
  """Reads and checks `config.optimizer`; ConfigError naming the field if it is wrong."""
  field = lambda name, *d: config_lib.get_field(config, f"optimizer.{name}", *d)
  s = Settings(learning_rate=field("learning_rate"), b1=field("b1"), b2=field("b2"),
               weight_decay=field("weight_decay"), warmup_steps=field("warmup_steps"),
               schedule=field("schedule", "cosine"), schedule_steps=field("schedule_steps", None),
               decay=field("decay", "matrices"))
  config_lib.check(isinstance(s.learning_rate, (int, float)) and s.learning_rate > 0,
                   f"config.optimizer.learning_rate must be positive, got {s.learning_rate!r}.")
  for name in ("b1", "b2"):
    value = getattr(s, name)
    config_lib.check(isinstance(value, (int, float)) and 0 <= value < 1,
                     f"config.optimizer.{name} must be in [0, 1), got {value!r}.")
  config_lib.check(isinstance(s.weight_decay, (int, float)) and s.weight_decay >= 0,
                   f"config.optimizer.weight_decay must be >= 0, got {s.weight_decay!r}.")
  config_lib.check(isinstance(s.warmup_steps, int) and s.warmup_steps >= 0,
                   f"config.optimizer.warmup_steps must be an integer >= 0, got "
                   f"{s.warmup_steps!r}.")
  config_lib.check(s.schedule_steps is None or (isinstance(s.schedule_steps, int)
                                                 and s.schedule_steps > 0),
                   f"config.optimizer.schedule_steps must be a positive integer or None, got "
                   f"{s.schedule_steps!r}.")
  SCHEDULES[s.schedule]  # an unknown name fails here, before any compute
  DECAY_MASKS[s.decay]
  return s


def make_optimizer(s: Settings, total_steps: int) -> optax.GradientTransformation:
  """AdamW under `s.schedule`, weight decay on the parameters `s.decay` names (by default not
  on biases and norms, the parameters of rank < 2).

  Args:
    s: the checked optimizer settings.
    total_steps: the configured steps of the run: the steps the schedule spans unless
      `s.schedule_steps` sets a longer horizon (a run stopped early on its schedule, as
      DP-Cap's 5,708 of 10,000).

  Returns:
    The optax transformation.
  """
  schedule = SCHEDULES[s.schedule](s.learning_rate, s.warmup_steps,
                                   s.schedule_steps or total_steps)
  return optax.adamw(schedule, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay,
                     mask=DECAY_MASKS[s.decay])
