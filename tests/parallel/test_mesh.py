"""The mesh, its shardings, the global batch, the hosts' shares of a batch, and a training run
sharded over a 2-device 'data' mesh (simulated CPU devices) that matches 1 device."""

import os
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from dpvl import checkpoint as checkpoint_lib
from dpvl import train
from dpvl.parallel import mesh as mesh_lib
from dpvl.privacy import sampling

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_the_mesh_has_one_data_axis_over_the_devices():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == (mesh_lib.DATA_AXIS,) == ("data",)
  assert dict(mesh.shape) == {"data": jax.device_count()}
  assert list(mesh.devices.flat) == jax.devices()
  assert dict(mesh_lib.make_mesh(jax.devices()[:1]).shape) == {"data": 1}


def test_state_is_replicated_and_micro_batches_are_split_over_the_data_axis():
  mesh = mesh_lib.make_mesh()
  assert mesh_lib.replicated(mesh).spec == P() and mesh_lib.replicated(mesh).mesh == mesh
  assert mesh_lib.batch_sharding(mesh).spec == P(None, "data")
  assert mesh_lib.batch_sharding(mesh).mesh == mesh


def test_global_batch_from_this_hosts_share():
  mesh = mesh_lib.make_mesh()
  local = dict(x=np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3),
               mask=np.arange(8).reshape(2, 4) % 3 > 0)
  for where in (mesh, mesh_lib.batch_sharding(mesh)):
    batch = mesh_lib.global_batch(where, local)
    assert set(batch) == {"x", "mask"}
    for name, value in batch.items():
      assert isinstance(value, jax.Array) and value.sharding == mesh_lib.batch_sharding(mesh)
      np.testing.assert_array_equal(value, local[name])  # one process: its share is all
  mask = mesh_lib.global_batch(mesh, local["mask"])  # a bare array is a tree too
  np.testing.assert_array_equal(mask, local["mask"])


def test_any_microbatch_size_splits_over_one_device():
  mesh_lib.check_microbatch_size(mesh_lib.make_mesh(jax.devices()[:1]), 3)


_FOUR_DEVICES = """
import jax, numpy as np
from dpvl import config as config_lib
from dpvl.parallel import mesh as mesh_lib
assert jax.device_count() == 4, jax.devices()
mesh = mesh_lib.make_mesh()
assert dict(mesh.shape) == {"data": 4}
mesh_lib.check_microbatch_size(mesh, 8)
try:
  mesh_lib.check_microbatch_size(mesh, 6)
  raise AssertionError("no ConfigError")
except config_lib.ConfigError as e:
  assert str(e) == ("config.batch.microbatch_size=6 must be divisible by the 4 devices of the "
                    "data axis."), e
x = np.arange(3 * 8 * 2).reshape(3, 8, 2)
batch = mesh_lib.global_batch(mesh, dict(x=x))["x"]
for i, device in enumerate(mesh.devices.flat):  # device i: columns 2i, 2i+1 of each micro-batch
  shard, = [s for s in batch.addressable_shards if s.device == device]
  np.testing.assert_array_equal(shard.data, x[:, 2 * i:2 * i + 2])
# host_slots agrees with the sharding: with 2 hosts of 2 devices each, host h loads the slots
# of its devices (2h and 2h + 1).
index = mesh_lib.batch_sharding(mesh).devices_indices_map((3, 8))
grid = np.arange(3 * 8).reshape(3, 8)
for host in range(2):
  held = np.concatenate([grid[index[d]] for d in list(mesh.devices.flat)[2 * host:2 * host + 2]],
                        axis=1)
  np.testing.assert_array_equal(mesh_lib.host_slots(3, 8, host, 2), held.ravel())
print("ok")
"""


def test_four_devices_split_each_micro_batch_as_host_slots_says():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("num_hosts", [1, 2, 4])
def test_hosts_compute_disjoint_shares_that_cover_the_selection(num_hosts):
  num_micro, micro = 3, 8
  make = lambda: sampling.PoissonSampler(5_000, 0.004, capacity=num_micro * micro, seed=11)
  full = make().select(9)
  # Each host builds its own sampler (as on a pod): no communication, the same selection.
  shares = [make().select(9).take(mesh_lib.host_slots(num_micro, micro, h, num_hosts))
            for h in range(num_hosts)]
  slots = np.concatenate([mesh_lib.host_slots(num_micro, micro, h, num_hosts)
                          for h in range(num_hosts)])
  np.testing.assert_array_equal(np.sort(slots), np.arange(num_micro * micro))
  assert all(s.indices.size == num_micro * micro // num_hosts for s in shares)
  chosen = np.concatenate([s.indices[s.mask] for s in shares])
  np.testing.assert_array_equal(np.sort(chosen), np.sort(full.indices[full.mask]))
  assert sum(s.size for s in shares) == full.size and full.size > 0
  # A host's share is the columns of each micro-batch its devices hold.
  grid = full.indices.reshape(num_micro, micro)
  width = micro // num_hosts
  np.testing.assert_array_equal(shares[-1].indices.reshape(num_micro, width),
                                grid[:, micro - width:])


def test_host_slots_arguments_are_checked():
  with pytest.raises(ValueError, match="host"):
    mesh_lib.host_slots(2, 8, 2, 2)
  with pytest.raises(ValueError, match="divisible"):
    mesh_lib.host_slots(2, 6, 0, 4)


# -- training on the mesh -------------------------------------------------------------------


_TWO_DEVICES = """
import sys, jax
assert jax.device_count() == 2, jax.devices()
from tests.configs_for_tests import small_dpcap_config
from dpvl import train
train.run(small_dpcap_config(), sys.argv[1], log=lambda *_: None)
"""


def _params(workdir):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  params = ckpt.restore_state_arrays()["params"]
  ckpt.close()
  return params


def test_two_device_data_parallel_run_matches_one_device(tmp_path, dpcap_config):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(tmp_path / "two")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  train.run(dpcap_config(), str(tmp_path / "one"), log=lambda *_: None)
  # Same batches, same noise (replicated parameters get identical draws on both devices); only
  # the order of the float32 sums differs.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               _params(str(tmp_path / "two")), _params(str(tmp_path / "one")))
