"""Orbax checkpoints of a run: train state (params, optimizer state, step) plus a JSON meta item
(the ledger and the run's root secret, `privacy.secrets`). Saves are atomic (orbax writes to a
temporary directory and renames); the newest `max_to_keep` are kept.

The meta item holds the run's root secret: keep checkpoints private, publish parameters only.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (state, meta) pairs under `directory`, keyed by step."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, meta); `abstract_state` gives structure, shapes, dtypes and shardings."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_state_arrays(self, step: int | None = None):
    """The saved train state on this host's first device, whatever topology saved it (e.g. to
    read the params of a pod run on one machine)."""
    step = self.latest_step() if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=device)))["state"]

  def close(self) -> None:
    self._manager.close()
