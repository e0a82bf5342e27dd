"""Evaluators by name (`config.evals.<name>.type`), run on the parameters during training and
standalone on a checkpoint (`--mode=eval`).

An evaluator reads only the parameters and public evaluation data, so running it during a
private run is post-processing: it costs no privacy budget.
"""

import dataclasses
from typing import Any, Callable

from dpvl import registry
from dpvl.config import ConfigError
from dpvl.config import get_field

# Builders: (config, name, objective) -> (params -> {metric: value}).
REGISTRY = registry.Registry("config.evals.<name>.type", {
    "linear_probe": "dpvl.evaluate.linear_probe:build",
    "zero_shot": "dpvl.evaluate.zero_shot:build",
    "retrieval": "dpvl.evaluate.retrieval:build",
})


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """name: the key under `config.evals`; every: steps between runs during training (0: only
  before the first and after the last step); evaluate: params -> {metric: value}."""

  name: str
  every: int
  evaluate: Callable[[Any], dict[str, float]]

  def __call__(self, params) -> dict[str, float]:
    """Metrics named `<name>/<metric>`."""
    return {f"{self.name}/{k}": v for k, v in self.evaluate(params).items()}


def build_evaluators(config, objective) -> list[Evaluator]:
  """The evaluators of `config.evals` (none if absent), each built once (data loaded here)."""
  evaluators = []
  for name in sorted(get_field(config, "evals", None) or {}):
    kind = get_field(config, f"evals.{name}.type")
    build = REGISTRY.lookup(kind, field=f"config.evals.{name}.type")
    every = int(get_field(config, f"evals.{name}.every", 0))
    if every < 0:
      raise ConfigError(f"config.evals.{name}.every must be >= 0, got {every}.")
    evaluators.append(Evaluator(name, every, build(config, name, objective)))
  return evaluators


def is_due(evaluator: Evaluator, step: int, last_step: int) -> bool:
  """Evaluators run before the first step, every `every` steps, and after the last step.

  Args:
    evaluator: the evaluator (its `every`; 0: only at the first and last step).
    step: the steps done so far (0: before the first).
    last_step: the run's last step.

  Returns:
    Whether `evaluator` runs at `step`.
  """
  return step in (0, last_step) or (evaluator.every > 0 and step % evaluator.every == 0)
