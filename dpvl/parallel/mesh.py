"""The device mesh, the shardings of the train state and the batch, and each host's share.

Today the mesh has one axis, `DATA_AXIS`, over all devices: the train state is replicated and
batches, laid out [num_microbatches, microbatch_size, ...], are sharded along the micro-batch
axis (`batch_sharding`). Each host loads only the slots its devices hold (`host_slots`) and
`global_batch` assembles the hosts' shares into global arrays. Further axes (e.g. fsdp, model)
belong in `make_mesh`, next to the shardings they change.
"""

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from dpvl import config as config_lib

DATA_AXIS = "data"  # the axis the batch (each micro-batch) is split over


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The training mesh: one `DATA_AXIS` axis over `devices`.

  Args:
    devices: the devices of the mesh, in order; default `jax.devices()` (all processes').

  Returns:
    A `Mesh` of shape {DATA_AXIS: len(devices)}.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the train state: a full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of [num_microbatches, microbatch_size, ...] arrays: each micro-batch split
  over `DATA_AXIS` (device i holds the i-th block of columns of every micro-batch)."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def data_axis_size(mesh: Mesh) -> int:
  """The number of devices along `DATA_AXIS`: the ways each micro-batch is split."""
  return mesh.shape[DATA_AXIS]


def check_microbatch_size(mesh: Mesh, microbatch_size: int) -> None:
  """Checks that the micro-batches split evenly over the data axis of `mesh`.

  Args:
    mesh: the training mesh.
    microbatch_size: `config.batch.microbatch_size` (the plan's).

  Raises:
    config_lib.ConfigError: if `microbatch_size` is not divisible by the data axis's size.
  """
  devices = data_axis_size(mesh)
  if microbatch_size % devices:
    raise config_lib.ConfigError(
        f"config.batch.microbatch_size={microbatch_size} must be divisible by the "
        f"{devices} devices of the data axis.")


def global_batch(mesh_or_sharding: Mesh | jax.sharding.Sharding, local_tree: Any) -> Any:
  """The global arrays whose rows on this process's devices are `local_tree`'s.

  Args:
    mesh_or_sharding: a mesh (its `batch_sharding`) or the sharding of the global arrays.
    local_tree: a pytree of this process's share of the batch (`BatchLoader.load`): arrays
      [num_microbatches, microbatch_size / num_processes, ...].

  Returns:
    The pytree of global `jax.Array`s [num_microbatches, microbatch_size, ...], assembled with
    `jax.make_array_from_process_local_data` (no copy between hosts).
  """
  if isinstance(mesh_or_sharding, Mesh):
    sharding = batch_sharding(mesh_or_sharding)
  else:
    sharding = mesh_or_sharding
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_tree)


def host_slots(num_microbatches: int, microbatch_size: int, host: int,
               num_hosts: int) -> np.ndarray:
  """The flat slots of a batch that host `host` loads: the rows its devices hold.

  Slots are laid out [num_microbatches, microbatch_size] and the micro-batch axis is split
  over the data axis (`batch_sharding`), whose devices are grouped by host, so host h holds the
  h-th contiguous block of columns of every micro-batch. The blocks of hosts 0..H-1 are
  disjoint and together cover every slot.

  Args:
    num_microbatches: micro-batches per step.
    microbatch_size: slots per micro-batch (global, over all hosts).
    host: this host's number, in [0, num_hosts) (`jax.process_index()`).
    num_hosts: the number of hosts (`jax.process_count()`).

  Returns:
    int array [num_microbatches * microbatch_size / num_hosts] of slot numbers, micro-batch
    by micro-batch.

  Raises:
    ValueError: if `host` is out of range or `microbatch_size` is not divisible by
      `num_hosts`.
  """
  if not 0 <= host < num_hosts:
    raise ValueError(f"host must be in [0, {num_hosts}), got {host}.")
  if microbatch_size % num_hosts:
    raise ValueError(f"microbatch_size={microbatch_size} must be divisible by the "
                     f"{num_hosts} hosts.")
  width = microbatch_size // num_hosts
  grid = np.arange(num_microbatches * microbatch_size).reshape(num_microbatches,
                                                               microbatch_size)
  return grid[:, host * width:(host + 1) * width].ravel()
