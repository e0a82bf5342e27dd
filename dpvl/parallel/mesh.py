"""The device mesh, the shardings of the train state and the batch, and each host's share.

The mesh has three named axes (`AXES`), sized by `config.mesh`:

  data    pure data parallelism: the state is replicated along it;
  fsdp    data parallelism with the state sharded along it (ZeRO-3 / FSDP): a leaf's largest
          dimension divisible by the axis size is split over it, and XLA gathers it for use;
  model   tensor parallelism, for leaves that a rule gives an explicit spec naming it.

The batch, laid out [num_microbatches, microbatch_size, ...], has each micro-batch split over
the data-parallel axes (`BATCH_AXES`: data and fsdp; `batch_sharding`); the per-example vmap
is told so (`spmd_axis_name=BATCH_AXES`). The state's shardings come from `config.mesh.rules`,
big_vision style: (regex, strategy) pairs matched in order against each leaf's path
("params/vit/block0/mlp/fc1/kernel", "opt_state/0/mu/...": the optimizer's moments follow
their parameters), the first match deciding: "fsdp", "replicate", or an explicit spec (a tuple
of axis names or None per dimension, e.g. (None, "model")). A leaf no rule matches is
replicated.

Each host loads only the slots its devices hold (`host_block`, `host_slots`) and
`global_batch` assembles the hosts' shares into global arrays.
"""

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from dpvl import config as config_lib

AXES = ("data", "fsdp", "model")
DATA_AXIS, FSDP_AXIS, MODEL_AXIS = AXES
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the axes a micro-batch is split over
DEFAULT_RULES = ((".*", "fsdp"),)
DEFAULT_FSDP_MIN_SIZE = 2**16  # leaves with fewer elements stay replicated
STRATEGIES = ("fsdp", "replicate")


def axis_sizes(config, num_devices: int) -> dict[str, int]:
  """The size of each of `AXES` from `config.mesh` (absent: all devices on `data`).

  Args:
    config: the run's config; `config.mesh.<axis>` is a positive size, or -1 (at most one
      axis) for the devices the others leave.
    num_devices: the devices the mesh spans.

  Returns:
    {axis: size} for every axis of `AXES`, whose product is `num_devices`; ConfigError
    otherwise.
  """
  sizes = {a: int(config_lib.get_field(config, f"mesh.{a}", -1 if a == DATA_AXIS else 1))
           for a in AXES}
  rest = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  config_lib.check(not bad and len(rest) <= 1,
                   f"config.mesh: sizes must be positive, with at most one -1 (the rest); got "
                   f"{sizes}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    config_lib.check(num_devices % known == 0,
                     f"config.mesh {sizes}: the {num_devices} devices do not divide into "
                     f"axes of {known}.")
    sizes[rest[0]] = num_devices // known
  config_lib.check(math.prod(sizes.values()) == num_devices,
                   f"config.mesh {sizes} needs {math.prod(sizes.values())} devices; there are "
                   f"{num_devices}.")
  return sizes


def make_mesh(config=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The training mesh over `devices`, its axes `AXES` sized by `config.mesh`.

  Args:
    config: the run's config (None: every device on the data axis).
    devices: the devices of the mesh; default `jax.devices()` (all processes').

  Returns:
    A `Mesh` with axes `AXES` (Auto axis types), laid out by `jax.make_mesh` for the
    platform's interconnect.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = axis_sizes(config, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of [num_microbatches, microbatch_size, ...] arrays: each micro-batch split
  over `BATCH_AXES` (device i of them holds the i-th block of columns of every micro-batch)."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def data_axis_size(mesh: Mesh) -> int:
  """The ways each micro-batch is split: the product of the `BATCH_AXES` sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_microbatch_size(mesh: Mesh, microbatch_size: int) -> None:
  """Checks that the micro-batches split evenly over the data-parallel axes of `mesh`.

  Args:
    mesh: the training mesh.
    microbatch_size: `config.batch.microbatch_size` (the plan's).

  Raises:
    config_lib.ConfigError: if `microbatch_size` is not divisible by their size.
  """
  devices = data_axis_size(mesh)
  if microbatch_size % devices:
    raise config_lib.ConfigError(
        f"config.batch.microbatch_size={microbatch_size} must be divisible by the "
        f"{devices} devices of the data axes {'x'.join(BATCH_AXES)}.")


def leaf_path(path) -> str:
  """A pytree path as "a/b/0/c" (dict keys, sequence indices, attribute names)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def rules(config) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules`, checked: (regex, "fsdp" | "replicate" | spec tuple) pairs."""
  given = config_lib.get_field(config, "mesh.rules", DEFAULT_RULES)
  checked = []
  for rule in given:
    config_lib.check(isinstance(rule, (tuple, list)) and len(rule) == 2,
                     f"config.mesh.rules: each rule is (regex, strategy); got {rule!r}.")
    pattern, strategy = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise config_lib.ConfigError(f"config.mesh.rules: bad regex {pattern!r}: {e}.") from None
    if isinstance(strategy, (tuple, list)):
      names = [n for n in strategy if n is not None]
      config_lib.check(all(n in AXES for n in names),
                       f"config.mesh.rules: spec {tuple(strategy)} for {pattern!r} names an "
                       f"axis outside {AXES}.")
      strategy = tuple(strategy)
    else:
      config_lib.check(strategy in STRATEGIES,
                       f"config.mesh.rules: strategy {strategy!r} for {pattern!r} must be one "
                       f"of {STRATEGIES} or a spec tuple.")
    checked.append((pattern, strategy))
  return tuple(checked)


def _fsdp_spec(shape: tuple[int, ...], size: int, min_size: int) -> P:
  """The largest dimension divisible by `size` split over FSDP_AXIS (P() if none, if the
  axis has one device, or if the leaf has fewer than `min_size` elements)."""
  if size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0:
      return P(*([None] * dim + [FSDP_AXIS]))
  return P()


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rule_list, min_size: int = 0) -> P:
  """The PartitionSpec of the state leaf at `path`: the first rule whose regex matches.

  Raises:
    config_lib.ConfigError: if an explicit spec does not fit the leaf's shape.
  """
  for pattern, strategy in rule_list:
    if not re.search(pattern, path):
      continue
    if strategy == "replicate":
      return P()
    if strategy == "fsdp":
      return _fsdp_spec(shape, mesh.shape[FSDP_AXIS], min_size)
    fits = len(strategy) <= len(shape) and all(
        name is None or shape[d] % mesh.shape[name] == 0 for d, name in enumerate(strategy))
    config_lib.check(fits, f"config.mesh.rules: spec {strategy} ({pattern!r}) does not fit "
                     f"{path} of shape {shape} on mesh {dict(mesh.shape)}.")
    return P(*strategy)
  return P()


def state_shardings(abstract_state, mesh: Mesh, config=None):
  """The sharding of each leaf of the train state, from `config.mesh.rules`.

  Args:
    abstract_state: the state's pytree (arrays or ShapeDtypeStructs).
    mesh: the training mesh.
    config: the run's config (its `mesh.rules` and `mesh.fsdp_min_size`); None: the defaults.

  Returns:
    A pytree of NamedShardings shaped like `abstract_state`; scalars are replicated.
  """
  rule_list = rules(config)
  min_size = int(config_lib.get_field(config, "mesh.fsdp_min_size", DEFAULT_FSDP_MIN_SIZE))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, leaf_spec(leaf_path(path), tuple(leaf.shape), mesh,
                                                       rule_list, min_size)),
      abstract_state)


def global_batch(mesh_or_sharding: Mesh | jax.sharding.Sharding, local_tree: Any) -> Any:
  """The global arrays whose rows on this process's devices are `local_tree`'s.

  Args:
    mesh_or_sharding: a mesh (its `batch_sharding`) or the sharding of the global arrays.
    local_tree: a pytree of this process's share of the batch (`BatchLoader.load`): arrays
      [num_microbatches, microbatch_size / num_blocks, ...] (`host_block`).

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


def host_block(mesh: Mesh, microbatch_size: int) -> tuple[int, int]:
  """(block, num_blocks): which contiguous block of columns of every micro-batch this process's
  devices hold, of how many equal blocks (processes that differ only along `model` share one).

  Raises:
    config_lib.ConfigError: if this process's devices hold columns that are not one block of
      equal ones (a mesh laid out across hosts in a way the loader cannot split).
  """
  index = batch_sharding(mesh).devices_indices_map((1, microbatch_size))
  local = {index[d][1].indices(microbatch_size)[:2] for d in mesh.local_devices}
  start, stop = min(s for s, _ in local), max(e for _, e in local)
  width = stop - start
  covered = sum(e - s for s, e in local)
  ok = covered == width and microbatch_size % width == 0 and start % width == 0
  config_lib.check(ok, f"this process's devices hold columns {sorted(local)} of each "
                   f"micro-batch of {microbatch_size}, not one contiguous block; lay out "
                   "config.mesh so that each host's devices are adjacent on the data axes.")
  return start // width, microbatch_size // width


def host_slots(num_microbatches: int, microbatch_size: int, host: int,
               num_hosts: int) -> np.ndarray:
  """The flat slots of a batch that host `host` loads: the rows its devices hold.

  Slots are laid out [num_microbatches, microbatch_size] and the micro-batch axis is split
  over the data axes (`batch_sharding`), whose devices are grouped by host (`host_block`), so
  host h holds the h-th contiguous block of columns of every micro-batch. The blocks of hosts
  0..H-1 are disjoint and together cover every slot.

  Args:
    num_microbatches: micro-batches per step.
    microbatch_size: slots per micro-batch (global, over all hosts).
    host: this host's block (`host_block`), in [0, num_hosts).
    num_hosts: the number of blocks (`host_block`).

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
