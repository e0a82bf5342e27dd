"""Evaluators by name (`config.evals.<name>.type`), run on the parameters during training and
standalone on a checkpoint (`--mode=eval`).

An evaluator reads only the parameters and public evaluation data, so running it during a
private run is post-processing: it costs no privacy budget.

An evaluator returns numbers (metrics.jsonl and TensorBoard) and may return other values too,
e.g. sample captions: `split_outputs` separates the two and `write_artifacts` keeps the others
in `WORKDIR/evals/step_<step>.json`.
"""

import dataclasses
import json
import numbers
import os
from typing import Any, Callable

import numpy as np

from dpvl import jsonfile
from dpvl import registry
from dpvl.config import ConfigError
from dpvl.config import get_field

# Builders: (config, name, objective) -> (params -> {metric: value}).
REGISTRY = registry.Registry("config.evals.<name>.type", {
    "linear_probe": "dpvl.evaluate.linear_probe:build",
    "streamed_linear_probe": "dpvl.evaluate.streamed_probe:build",
    "zero_shot": "dpvl.evaluate.zero_shot:build",
    "retrieval": "dpvl.evaluate.retrieval:build",
    "few_shot": "dpvl.evaluate.few_shot:build",
    "caption_zero_shot": "dpvl.evaluate.captioner:build_zero_shot",
    "caption_order": "dpvl.evaluate.captioner:build_order",
    "caption_samples": "dpvl.evaluate.captioner:build_samples",
})


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """name: the key under `config.evals`; every: steps between runs during training (0: only
  before the first and after the last step); evaluate: params -> {metric: value}, values
  numbers or, for artifacts (`split_outputs`), any JSON-ready value."""

  name: str
  every: int
  evaluate: Callable[[Any], dict[str, Any]]

  def __call__(self, params) -> dict[str, Any]:
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


def _is_scalar(value) -> bool:
  """A Python, numpy or 0-d array number or bool."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value[()]
  return isinstance(value, (numbers.Number, np.number, np.bool_))


def split_outputs(row: dict) -> tuple[dict, dict]:
  """(scalars, artifacts) of an evaluation row: numbers (bools included; numpy scalars as
  Python numbers) and everything else (text, lists, dicts, arrays), in the row's order.

  >>> split_outputs({"step": 3, "p/top1": 0.5, "s/captions": ["a red circle"]})
  ({'step': 3, 'p/top1': 0.5}, {'s/captions': ['a red circle']})

  Args:
    row: a metrics row, e.g. `{"step": ..., **evaluator(params)}`.

  Returns:
    (the row's numbers, for `MetricsWriter.write` and the log line; the rest, for
    `write_artifacts`).
  """
  scalars = {k: v.item() if isinstance(v, (np.generic, np.ndarray)) else v
             for k, v in row.items() if _is_scalar(v)}
  return scalars, {k: v for k, v in row.items() if k not in scalars}


def _jsonable(value):
  """`value` with numpy arrays and scalars (at any depth) as lists and Python numbers."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  return value


def write_artifacts(workdir: str, step: int, artifacts: dict) -> str | None:
  """Adds `artifacts` to `WORKDIR/evals/step_<step>.json`, written atomically.

  Artifacts already in the file (other evaluators at the same step, an earlier standalone
  evaluation) are kept unless a key is written again. Nothing is written for no artifacts.

  Args:
    workdir: the run directory.
    step: the step the parameters are at.
    artifacts: name -> JSON-ready value (numpy arrays are written as lists), e.g. the second
      value of `split_outputs`.

  Returns:
    The file's path, or None when `artifacts` is empty.
  """
  if not artifacts:
    return None
  path = os.path.join(workdir, "evals", f"step_{int(step)}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  content = {}
  if os.path.exists(path):
    with open(path) as f:
      content = json.load(f)
  content.update(_jsonable(dict(artifacts)), step=int(step))
  jsonfile.write_atomic(path, content)
  return path
