"""Orbax checkpoints of a run: train state (params, optimizer state, step) plus a JSON meta item
(the ledger and the run's root secret, `privacy.secrets`). Saves are atomic (orbax writes to a
temporary directory and renames); the newest `max_to_keep` are kept. In a multi-process run
every process saves and restores its own shards of the state (call each method on all).

The meta item holds the run's root secret: keep checkpoints private, publish parameters only.
"""

import os

import jax
import orbax.checkpoint as ocp

from dpvl.parallel import hosts


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

  def save(self, step: int, state, meta: dict, wait: bool = True) -> None:
    """Saves (state, meta) as checkpoint `step`.

    Args:
      step: the training step the checkpoint is keyed by.
      state: the train state pytree (params, optimizer state, step).
      meta: the JSON-serializable meta item (the run's root secret and the ledger entry).
      wait: wait until the write has finished. Otherwise return once the state is copied to
        the host (its buffers may then be donated) and write in the background: the next
        save and `close` wait for it, and an unfinished write is never taken for a checkpoint.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if wait:
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

  def newest_intact(self, abstract_state, set_aside: str, log=print):
    """(step, state, meta) of the newest checkpoint that restores whole, or None if none does.

    A newer one that does not restore (a missing item, unreadable array files, a torn write) is
    moved to `set_aside/<step>`, kept for inspection, with one line saying why: the run goes on
    from the one before, and a later save of that step finds its place free.

    Args:
      abstract_state: the train state's structure, shapes, dtypes and shardings (as `restore`).
      set_aside: the directory unrestorable checkpoints are moved to (created if needed).
      log: called with one line per checkpoint set aside.

    Returns:
      (step, state, meta) of the newest checkpoint that restores, or None if none does.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(abstract_state, step)
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except  # orbax and tensorstore vary
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        target = os.path.join(set_aside, str(step))
        if hosts.is_primary():  # one process moves it; the others wait for the move
          os.makedirs(set_aside, exist_ok=True)
          copies = 0
          while os.path.exists(target):  # set aside before
            copies += 1
            target = os.path.join(set_aside, f"{step}.{copies}")
          os.replace(os.path.join(self.directory, str(step)), target)
        hosts.sync(f"dpvl_set_aside_{step}")
        self._manager.reload()
        log(f"checkpoint {step} cannot be restored ({type(e).__name__}: {reason}); moved to "
            f"{target}, going back to the one before.")
    return None

  @property
  def directory(self) -> str:
    return os.fspath(self._manager.directory)

  def restore_state_arrays(self, step: int | None = None):
    """The saved train state on this host's first device, whatever topology saved it (e.g. to
    read the params of a pod run on one machine)."""
    step = self.latest_step() if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=device)))["state"]

  def close(self) -> None:
    self._manager.close()
