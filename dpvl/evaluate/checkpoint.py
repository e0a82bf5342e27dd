"""`--mode=eval`: the run's evaluators on the parameters of one of its checkpoints."""

import os

import jax

from dpvl import checkpoint as checkpoint_lib
from dpvl import config as config_lib
from dpvl import evaluate
from dpvl import metrics as metrics_lib
from dpvl import objectives
from dpvl.parallel import hosts
from dpvl.privacy import provenance


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Runs `config.evals` on the parameters of a checkpoint and appends the row to the metrics.

  Args:
    config: the run's config (its model and `evals`).
    workdir: the run directory; it is never created here.
    step: the checkpoint's step (default: the latest).

  Returns:
    The metrics row, marked `"standalone": true` (with any non-numeric outputs, which go to
    the workdir's evals/step_<step>.json rather than the metrics). ConfigError if there is no
    such checkpoint, no evaluator, or the checkpoint holds another model.
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # and do not create it
    raise config_lib.ConfigError(f"{workdir} holds no checkpoint.")
  objective = objectives.build_objective(config)
  evaluators = evaluate.build_evaluators(config, objective)
  if not evaluators:
    raise config_lib.ConfigError("config.evals names no evaluator.")
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.all_steps():
    raise config_lib.ConfigError(f"{workdir} holds no checkpoint"
                                 + ("" if step is None else f" at step {step}") + ".")
  params = hosts.whole(ckpt.restore_state_arrays(step)["params"])  # on every process
  ckpt.close()
  if not provenance.same_model(params, jax.eval_shape(objective.init, jax.random.key(0))):
    raise config_lib.ConfigError(f"the checkpoint in {workdir} holds another model than "
                                 "config.model.")
  row = dict(step=step, standalone=True)
  for evaluator in evaluators:
    row.update(evaluator(params))
  scalars, artifacts = evaluate.split_outputs(row)
  writer = metrics_lib.MetricsWriter(workdir, enabled=hosts.is_primary())
  writer.write(scalars)
  writer.close()
  if hosts.is_primary():  # every process of a multi-host eval computes the same row
    evaluate.write_artifacts(workdir, step, artifacts)
  return row
