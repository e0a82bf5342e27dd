"""The mesh, its axes and sharding rules, the global batch, the hosts' shares of a batch, and
the noise on every mesh (training on several meshes and processes: test_multiprocess.py)."""

import os
import subprocess
import sys

import jax
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from dpvl.parallel import mesh as mesh_lib
from dpvl.privacy import sampling
from tests.helpers import raises_config_error

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_the_mesh_has_named_axes_and_puts_every_device_on_data_by_default():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == mesh_lib.AXES == ("data", "fsdp", "model")
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "model": 1}
  assert list(mesh.devices.flat) == jax.devices()
  assert mesh_lib.BATCH_AXES == ("data", "fsdp")


@pytest.mark.parametrize("sizes,devices,expected", [
    ({}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4, 1)),
    ({"data": -1, "fsdp": 2, "model": 2}, 16, (4, 2, 2)),
    ({"data": 1, "fsdp": 8}, 8, (1, 8, 1)),
])
def test_axis_sizes_fill_the_rest(sizes, devices, expected):
  config = ml_collections.ConfigDict(dict(mesh=dict(sizes)))
  assert tuple(mesh_lib.axis_sizes(config, devices).values()) == expected


@pytest.mark.parametrize("sizes,message", [
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"fsdp": 0}, "positive"),
    ({"data": 3, "fsdp": -1}, "do not divide"),
    ({"data": 2, "fsdp": 2}, "needs 4 devices; there are 8"),
])
def test_axis_sizes_that_do_not_fit_the_devices_are_refused(sizes, message):
  config = ml_collections.ConfigDict(dict(mesh=dict(sizes)))
  with raises_config_error(message):
    mesh_lib.axis_sizes(config, 8)


def test_sharding_rules_first_match_decides():
  mesh = AbstractMesh((2, 4, 2), mesh_lib.AXES)
  rules = mesh_lib.rules(ml_collections.ConfigDict(dict(mesh=dict(rules=(
      ("embedding", "replicate"), ("attn/.*kernel", (None, "model")), (".*", "fsdp"))))))
  spec = lambda path, shape, min_size=0: mesh_lib.leaf_spec(path, shape, mesh, rules, min_size)
  assert spec("params/decoder/embedding", (512, 64)) == P()
  assert spec("params/encoder/attn/q/kernel", (64, 64)) == P(None, "model")
  assert spec("opt_state/0/mu/encoder/attn/q/kernel", (64, 64)) == P(None, "model")  # moments
  assert spec("params/encoder/mlp/kernel", (64, 256)) == P(None, "fsdp")  # largest dim
  assert spec("params/encoder/mlp/kernel", (6, 8)) == P(None, "fsdp")  # the largest divisible
  assert spec("params/encoder/norm/scale", (6,)) == P()  # none divisible: replicated
  assert spec("params/encoder/mlp/kernel", (64, 256), min_size=1 << 20) == P()  # small
  assert mesh_lib.leaf_spec("step", (), mesh, (), 0) == P()  # no rule matches: replicated
  with raises_config_error("does not fit"):
    spec("params/encoder/attn/q/kernel", (64, 3))


@pytest.mark.parametrize("rules,message", [
    ((("[", "fsdp"),), "bad regex"),
    (((".*", "shard"),), "must be one of"),
    (((".*", (None, "tensor")),), "names an axis outside"),
    ((".*",), "each rule is"),
])
def test_bad_sharding_rules_are_refused(rules, message):
  with raises_config_error(message):
    mesh_lib.rules(ml_collections.ConfigDict(dict(mesh=dict(rules=rules))))


def test_state_shardings_cover_params_and_optimizer_moments():
  mesh = AbstractMesh((1, 4, 1), mesh_lib.AXES)
  state = dict(params=dict(w=jax.ShapeDtypeStruct((8, 4), np.float32)),
               opt_state=(dict(mu=dict(w=jax.ShapeDtypeStruct((8, 4), np.float32))),),
               step=jax.ShapeDtypeStruct((), np.int32))
  config = ml_collections.ConfigDict(dict(mesh=dict(fsdp_min_size=0)))
  shardings = mesh_lib.state_shardings(state, mesh, config)
  assert shardings["params"]["w"].spec == shardings["opt_state"][0]["mu"]["w"].spec == P("fsdp")
  assert shardings["step"].spec == P()


def test_micro_batches_are_split_over_the_data_axes():
  mesh = mesh_lib.make_mesh()
  assert mesh_lib.batch_sharding(mesh).spec == P(None, ("data", "fsdp"))
  assert mesh_lib.batch_sharding(mesh).mesh == mesh
  assert mesh_lib.host_block(mesh, 16) == (0, 1)  # one process holds every column


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
  mesh_lib.check_microbatch_size(mesh_lib.make_mesh(devices=jax.devices()[:1]), 3)


_EIGHT_DEVICES = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from dpvl import config as config_lib
from dpvl.parallel import mesh as mesh_lib
from dpvl.privacy import noise
assert jax.device_count() == 8, jax.devices()
mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(mesh=dict(data=2, fsdp=-1))))
assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
mesh_lib.check_microbatch_size(mesh, 8)
try:
  mesh_lib.check_microbatch_size(mesh, 12)
  raise AssertionError("no ConfigError")
except config_lib.ConfigError as e:
  assert str(e) == ("config.batch.microbatch_size=12 must be divisible by the 8 devices of the "
                    "data axes dataxfsdp."), e
x = np.arange(3 * 16 * 2).reshape(3, 16, 2)
batch = mesh_lib.global_batch(mesh, dict(x=x))["x"]
for i, device in enumerate(mesh.devices.flat):  # device i: columns 2i, 2i+1 of each micro-batch
  shard, = [s for s in batch.addressable_shards if s.device == device]
  np.testing.assert_array_equal(shard.data, x[:, 2 * i:2 * i + 2])
# host_slots agrees with the sharding: with 2 hosts of 4 devices each, host h loads the slots
# of its devices.
index = mesh_lib.batch_sharding(mesh).devices_indices_map((3, 16))
grid = np.arange(3 * 16).reshape(3, 16)
for host in range(2):
  held = np.concatenate([grid[index[d]] for d in list(mesh.devices.flat)[4 * host:4 * host + 4]],
                        axis=1)
  np.testing.assert_array_equal(mesh_lib.host_slots(3, 16, host, 2), held.ravel())

# The noise of one key is the same bits on every mesh, and under an fsdp sharding each device
# draws only its shard (the compiled program generates [16, 32] blocks, never [64, 32]).
key, shape = jax.random.key(7), (64, 32)
draws = []
for sizes, spec in [(dict(data=1), P()), (dict(data=8), P()), (dict(data=2, fsdp=4), P("fsdp")),
                    (dict(data=1, fsdp=8), P(None, "fsdp"))]:
  m = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(mesh=sizes)),
                         jax.devices()[:1] if sizes == dict(data=1) else None)
  where = NamedSharding(m, spec)
  draw = jax.jit(lambda k: noise.add_gaussian_noise(dict(w=np.zeros(shape, np.float32)), k,
                                                    2.0, dict(w=where))["w"])
  if spec == P("fsdp"):
    text = draw.lower(key).compile().as_text()
    assert "f32[16,32]" in text and "f32[64,32]" not in text and "u32[64,32]" not in text
  out = draw(key)
  assert out.sharding.spec == spec
  draws.append(np.asarray(out))
for d in draws[1:]:
  np.testing.assert_array_equal(d, draws[0])
assert abs(draws[0].std() - 2.0) < 0.1
print("ok")
"""


def test_eight_devices_split_batches_and_draw_the_same_noise_on_every_mesh():
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], cwd=ROOT, env=env,
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
