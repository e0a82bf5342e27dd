"""A run's metrics: one JSON object per line in `metrics.jsonl`, and the same numbers as
TensorBoard scalars under `tensorboard/` (view them with `pip install -e ".[tensorboard]"`, then
`tensorboard --logdir=WORKDIR/tensorboard`).

A training row holds its public and DP numbers at the top level (`step`, `epsilon`, timings,
`dp_loss`) and what is computed on the private data without noise under
`private_data_diagnostics` (`dpvl.train.metrics_row`); nested keys become TensorBoard tags
joined with '/'."""

import json
import numbers
import os

from tensorboardX import SummaryWriter


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
  """The numeric leaves of `row` (nested dicts joined with '/'), without `step`."""
  out = {}
  for key, value in row.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(scalars(value, name + "/"))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and name != "step":
      out[name] = float(value)
  return out


class MetricsWriter:
  """Appends rows (each with a `step`) to metrics.jsonl and TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True):
    """`enabled=False` (the processes but the primary of a multi-host run) writes nothing."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None

  def write(self, row: dict) -> None:
    if self._tensorboard is None:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in scalars(row).items():
      self._tensorboard.add_scalar(name, value, row["step"])
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def last_training_row(workdir: str) -> dict:
  """The last training row (one with an `epsilon`, which every training row has and no
  evaluation row) of `workdir`'s metrics.jsonl ({} if none): the last step whose metrics were
  released."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return next((r for r in reversed(rows) if "epsilon" in r), {})
