"""The train step sharded over a 2-device 'data' mesh (simulated CPU devices) matches 1 device."""

import os
import subprocess
import sys

from conftest import small_dpcap_config
import jax
import numpy as np

from dpvl import checkpoint as checkpoint_lib
from dpvl import train

ROOT = os.path.join(os.path.dirname(__file__), "..")

_SCRIPT = """
import sys, jax
sys.path.insert(0, "tests")
assert jax.device_count() == 2, jax.devices()
from conftest import small_dpcap_config
from dpvl import train
train.run(small_dpcap_config(), sys.argv[1], log=lambda *_: None)
"""


def _params(workdir):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  params = ckpt.restore_state_arrays()["params"]
  ckpt.close()
  return params


def test_two_device_data_parallel_run_matches_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "two")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  train.run(small_dpcap_config(), str(tmp_path / "one"), log=lambda *_: None)
  # Same batches, same noise (replicated parameters get identical draws on both devices); only
  # the order of the float32 sums differs.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               _params(str(tmp_path / "two")), _params(str(tmp_path / "one")))
