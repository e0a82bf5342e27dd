"""A corrupted newest checkpoint: the run goes back to the newest intact one, says so in one line,
and replays from there bit for bit; with none intact, the ledger's rule for lost checkpoints."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from dpvl import checkpoint as checkpoint_lib
from dpvl import train
from dpvl.privacy import ledger as ledger_lib


def _params(workdir, step=None):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  params = ckpt.restore_state_arrays(step)["params"]
  ckpt.close()
  return params


def _scramble_arrays(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
      f.write(np.random.default_rng(size).bytes(size))


CORRUPTIONS = {
    "missing state": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "random bytes in array files": _scramble_arrays,
    "missing meta/metadata": lambda d: os.remove(os.path.join(d, "meta", "metadata")),
}


def test_a_corrupted_newest_checkpoint_falls_back_to_the_one_before(tmp_path, dpcap_config):
  workdir = str(tmp_path)
  config = dpcap_config()  # 6 steps, checkpoints at 0, 3 and 6
  train.run(config, workdir, log=lambda *_: None)
  final = _params(workdir)
  for name, corrupt in CORRUPTIONS.items():
    corrupt(os.path.join(workdir, "checkpoints", "6"))
    logs = []
    entry = train.run(config, workdir, log=logs.append)
    assert any(line.startswith("checkpoint 6 cannot be restored") for line in logs), name
    assert "resumed from step 3 in " + workdir in logs, name
    # Steps 4-6 are recomputed bit for bit: no step is accounted twice.
    assert entry["status"] == "completed" and entry["steps_accounted"] == 6, name
    jax.tree.map(np.testing.assert_array_equal, _params(workdir), final)
    kept = os.path.join(workdir, "unrestorable_checkpoints", "6")
    assert os.path.isdir(kept), name
    shutil.rmtree(kept)

  for step in (0, 3, 6):  # none intact: as with lost checkpoints, the ledger is not forgotten
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))
  with pytest.raises(ledger_lib.ResumeError, match="no checkpoint to resume from"):
    train.run(config, workdir, log=lambda *_: None)
  assert json.load(open(os.path.join(workdir, "privacy.json")))["steps_accounted"] == 6
