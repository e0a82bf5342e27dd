"""`--mode=compile`: the full private step of a config, lowered and compiled without data.

The model, the optimizer and the private step are built exactly as `train` builds them, on
abstract inputs (shapes, dtypes and shardings only): nothing is read, initialised or run. The
compiled step's memory analysis says whether it fits the devices; its cost analysis gives the
FLOPs. XLA counts a loop's body once, so the FLOPs of a step are those of a one-micro-batch step
times the number of micro-batches (which counts the noise and the update once per micro-batch:
an overestimate by a few parameter-sized operations). The cost analysis of a program partitioned
over a mesh counts one device's share: the FLOPs (like the bytes) are per device (dpcap_tiny:
1.74e10 on one CPU device, 2.37e9 on each of 8).

`--topology` (`topology_devices`) compiles for the devices of a TPU slice from any host, a CPU
one included: `jax.experimental.topologies.get_topology_desc(name, platform="tpu")` has libtpu
(`pip install "dpvl[tpu]"`) describe the slice's chips as compile-only devices, and the step is
compiled for them by the TPU compiler. Nothing else is needed on a host without TPU chips: jax
sets TPU_SKIP_MDS_QUERY=1 there itself (no metadata server is asked) and JAX_PLATFORMS may stay
unset (the local backend is still the CPU). One process at a time holds libtpu's lock
(/tmp/libtpu_lockfile): to compile in two at once, set ALLOW_MULTIPLE_LIBTPU_LOAD=1 (harmless
where no TPU chip is attached: compile-only devices open none). libtpu logs a few harmless lines
on stderr, that it could not determine TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES; setting
both (e.g. TPU_WORKER_HOSTNAMES=localhost TPU_ACCELERATOR_TYPE=v5litepod-4) silences them
without changing the topology. Such devices do not report their memory (`memory_stats()`
raises), so the limit is the chip's nominal HBM, by `device_kind` (`TPU_CHIPS`); the report
names its source.
"""

import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies
import jax.numpy as jnp

from dpvl import config as config_lib
from dpvl import train
from dpvl.parallel import mesh as mesh_lib
from dpvl.privacy import plan as plan_lib


def _abstract_batch(objective, plan: plan_lib.PrivacyPlan, num_microbatches: int, sharding):
  """Abstract [num_microbatches, microbatch_size, ...] examples and mask."""
  lead = (num_microbatches, plan.microbatch_size)
  examples = {k: jax.ShapeDtypeStruct(lead + tuple(v.shape), v.dtype, sharding=sharding)
              for k, v in objective.example_spec.items()}
  return examples, jax.ShapeDtypeStruct(lead, jnp.bool_, sharding=sharding)


def compile_step(config, devices=None) -> dict:
  """Compiles `config`'s private train step for `devices` (default: all) and reports it.

  Args:
    config: the run's config (its data is never read).
    devices: the devices of the mesh; default `jax.devices()`.

  Returns:
    A JSON-able dict: parameter count, FLOPs per step, per-device bytes (arguments, outputs,
    temporaries, total), the mesh, and whether the total fits each device's memory (None when
    the platform does not say; the device memory's source is named). A step the TPU compiler
    refuses for want of memory has fits=False, its FLOPs and bytes None, and `out_of_memory`:
    the compiler's line (what the step needs, what the device has).
  """
  setup = train.check(config, workdir=None, devices=devices)  # no data is read
  objective, plan, mesh = setup.objective, setup.plan, setup.mesh
  optimizer = train.make_optimizer(setup)
  _, abstract_state = train.abstract_state(config, setup, optimizer)
  step = jax.jit(train.make_train_step(setup.gradient, optimizer, plan,
                                       train.shardings_of(abstract_state["params"])),
                 donate_argnums=0)
  key = jax.eval_shape(lambda: jax.random.key(0))

  def compiled(num_microbatches):
    """The compiled step, or the compiler's one line refusing a step that does not fit."""
    examples, mask = _abstract_batch(objective, plan, num_microbatches,
                                     mesh_lib.batch_sharding(mesh))
    keys = (key, key) if plan.loss_estimate else (key,)  # noise (and loss noise) keys
    lowered = step.lower(abstract_state, examples, mask, key, *keys)
    try:
      return lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler checks the device's memory
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return " ".join(str(e).split())

  full = compiled(plan.num_microbatches)
  device = mesh.devices.flat[0]
  limit, limit_source = device_memory(device)
  params = abstract_state["params"]
  report = dict(
      objective=config.objective,
      mechanism=plan.mechanism.name,
      batch=dict(expected_size=plan.expected_batch_size, capacity=plan.capacity,
                 num_microbatches=plan.num_microbatches, microbatch_size=plan.microbatch_size),
      parameters=sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
  )
  where = dict(mesh=dict(shape=dict(mesh.shape), platform=device.platform,
                         device_kind=device.device_kind),
               device_memory_bytes=limit, device_memory_source=limit_source)
  if isinstance(full, str):  # no memory or cost analysis of a step the compiler refuses
    return dict(report, flops_per_step_per_device=None, flops_per_microbatch_per_device=None,
                bytes_per_device=None, **where, fits=False, out_of_memory=full)
  one = full if plan.num_microbatches == 1 else compiled(1)
  per_microbatch = math.nan if isinstance(one, str) else xla_flops(one)
  memory = full.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return dict(
      report,
      flops_per_step_per_device=per_microbatch * plan.num_microbatches,
      flops_per_microbatch_per_device=per_microbatch,
      bytes_per_device=dict(arguments=memory.argument_size_in_bytes,
                            outputs=memory.output_size_in_bytes,
                            temporaries=memory.temp_size_in_bytes,
                            aliased=memory.alias_size_in_bytes, total=total),
      **where,
      fits=None if limit is None else total <= limit,
  )


def xla_flops(compiled) -> float:
  """The FLOPs XLA's cost analysis counts for a compiled program (loop bodies once)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", math.nan))


# A TPU chip's HBM (GiB) and TensorCores, by the `device_kind` its devices report (the
# compile-only devices of a topology too): the public per-chip figures of Cloud TPU. A device
# spans `device.num_cores` of its chip's cores: 1 on v2 and v3, 2 on v4 and v5p (megacore).
TPU_CHIPS = {
    "TPU v2": (16, 2),
    "TPU v3": (32, 2),
    "TPU v4": (32, 2),
    "TPU v5 lite": (16, 1),  # v5e
    "TPU v5": (95, 2),  # v5p
    "TPU v6 lite": (32, 1),  # v6e (Trillium)
}


def tpu_memory(device_kind: str, num_cores: int) -> int | None:
  """A TPU device's nominal HBM in bytes: its chip's, times its share of the chip's cores.

  Args:
    device_kind: the device's `device_kind` ("TPU v5 lite", "TPU v4", ...).
    num_cores: the TensorCores the device spans (`device.num_cores`).

  Returns:
    The bytes, or None for a device kind `TPU_CHIPS` does not list.
  """
  if device_kind not in TPU_CHIPS:
    return None
  gib, cores = TPU_CHIPS[device_kind]
  return gib * 2**30 * num_cores // cores


def device_memory(device) -> tuple[int | None, str | None]:
  """(bytes, source): the memory of `device` as its platform reports it ("memory_stats"), else
  a TPU's nominal HBM ("nominal HBM of a <device_kind> chip"), else (None, None)."""
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  # CPU, compile-only devices do not say
    limit = None
  if limit is not None:
    return limit, "memory_stats"
  kind = device.device_kind
  limit = tpu_memory(kind, getattr(device, "num_cores", TPU_CHIPS.get(kind, (0, 1))[1]))
  return (None, None) if limit is None else (limit, f"nominal HBM of a {kind} chip")


# Cloud TPU accelerator types (v5e-256, v4-128): generation -> (libtpu's topology prefix, the
# dimensions of the chip grid, the TensorCores per chip that the type's count counts).
_GENERATIONS = {
    "v2": ("v2", 2, 2),
    "v3": ("v3", 2, 2),
    "v4": ("v4", 3, 2),
    "v5p": ("v5p", 3, 2),
    "v5e": ("v5e", 2, 1),
    "v5litepod": ("v5e", 2, 1),
    "v6e": ("v6e", 2, 1),
}
_MEGACORE = ("v4", "v5", "v5p")  # one device per chip (its two TensorCores), as jax runs them


def _chip_grid(chips: int, dims: int) -> list[int]:
  """The most even power-of-two grid of `chips` chips, as Cloud TPU lays slices out (4x4x8,
  16x16, 8x16; 2x2x1 for 4 chips in 3-D)."""
  grid = [1] * dims
  while math.prod(grid) < chips:
    grid[max(i for i in range(dims) if grid[i] == min(grid))] *= 2  # the last smallest side
  return grid[::-1] if dims == 3 and grid[0] == 1 else grid


def topology_spec(name: str) -> tuple[str, dict]:
  """(topology, kwargs) for `get_topology_desc` from a `--topology` value.

  Args:
    name: a Cloud TPU accelerator type ("v5e-256", "v4-128", "v5p-64", "v6e-16": the count is
      of chips for v5e and v6e, of TensorCores for v2, v3, v4 and v5p, and must be a power of
      two), or a topology as libtpu names it ("v5e:16x16", "v4:4x4x4"), passed as is.

  Returns:
    libtpu's topology name ("v5e:16x16") and the keyword arguments of `get_topology_desc`:
    megacore chips (one device per chip) for v4 and v5p; a slice of fewer chips than a host's
    2x2 is one host.
  """
  typed = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", name.strip().lower())
  if typed:
    config_lib.check(typed[1] in _GENERATIONS,
                     f"--topology={name}: unknown TPU generation {typed[1]!r} (known: "
                     f"{', '.join(_GENERATIONS)}); a libtpu topology such as v5e:16x16 works too.")
    prefix, dims, cores = _GENERATIONS[typed[1]]
    chips, odd = divmod(int(typed[2]), cores)
    config_lib.check(chips >= 1 and not odd and chips & (chips - 1) == 0,
                     f"--topology={name}: a slice is named by its size only for a power of two "
                     f"of chips; name its chip grid instead, e.g. "
                     f"{prefix}:{'x'.join(['4'] * dims)}.")
    name = f"{prefix}:{'x'.join(map(str, _chip_grid(chips, dims)))}"
  name = name.strip()
  generation = re.split(r"[=_:]", name, maxsplit=1)[0].lower().removeprefix("tpu ")
  kwargs = dict(chip_config_name="megacore") if generation in _MEGACORE else {}
  shape = re.search(r"[=_:]([0-9]+(?:x[0-9]+)*)", name)
  grid = [int(n) for n in shape[1].split("x")] if shape else []
  if grid and math.prod(grid) < 4:  # libtpu's default host is 2x2x1 chips
    kwargs["chips_per_host_bounds"] = tuple(grid + [1] * (3 - len(grid)))
  return name, kwargs


def _libtpu_installed() -> bool:
  """Whether libtpu can be loaded: the `libtpu` package, or a TPU_LIBRARY_PATH to its .so."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
  """The devices of the TPU slice `name`, to compile for from any host (no TPU needed).

  Args:
    name: a `--topology` value (`topology_spec`): "v5e-256", "v4-128", "v5e:16x16", ...

  Returns:
    The slice's compile-only devices (one per chip, per TensorCore on v2 and v3; their
    `device_kind`s: "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p), "TPU v6 lite" (v6e));
    ConfigError in one sentence if the name is not one, libtpu is not installed or rejects it.
  """
  topology, kwargs = topology_spec(name)
  if not _libtpu_installed():
    raise config_lib.ConfigError(
        f"--topology={name} needs libtpu (the TPU compiler), which is not installed: "
        'pip install "dpvl[tpu]".')
  try:
    return list(topologies.get_topology_desc(topology, platform="tpu", **kwargs).devices)
  except RuntimeError as e:  # JaxRuntimeError: libtpu rejects the topology
    reason = " ".join(str(e).split("=== Source Location")[0].split())
    if "lockfile" in reason:
      reason = ("another process holds libtpu (/tmp/libtpu_lockfile); wait for it, or set "
                "ALLOW_MULTIPLE_LIBTPU_LOAD=1 where no TPU chip is attached")
    raise config_lib.ConfigError(f"--topology={name} ({topology}): {reason.rstrip('.')}.") from e
