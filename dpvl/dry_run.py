"""`--mode=compile`: the full private step of a config, lowered and compiled without data.

The model, the optimizer and the private step are built exactly as `train` builds them, on
abstract inputs (shapes, dtypes and shardings only): nothing is read, initialised or run. The
compiled step's memory analysis says whether it fits the devices; its cost analysis gives the
FLOPs. XLA counts a loop's body once, so the FLOPs of a step are those of a one-micro-batch step
times the number of micro-batches (which counts the noise and the update once per micro-batch:
an overestimate by a few parameter-sized operations).
"""

import math

import jax
import jax.numpy as jnp

from dpvl import optim
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
    the platform does not say).
  """
  setup = train.check(config, workdir=None, devices=devices)  # no data is read
  objective, plan, mesh = setup.objective, setup.plan, setup.mesh
  optimizer = optim.make_optimizer(setup.optimizer, plan.configured_steps)
  _, abstract_state = train.abstract_state(setup, optimizer)
  step = jax.jit(train.make_train_step(setup.gradient, optimizer, plan), donate_argnums=0)
  key = jax.eval_shape(lambda: jax.random.key(0))

  def compiled(num_microbatches):
    examples, mask = _abstract_batch(objective, plan, num_microbatches,
                                     mesh_lib.batch_sharding(mesh))
    return step.lower(abstract_state, examples, mask, key, key).compile()

  full = compiled(plan.num_microbatches)
  one = full if plan.num_microbatches == 1 else compiled(1)
  memory = full.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  limit = _device_memory(mesh.devices.flat[0])
  params = abstract_state["params"]
  return dict(
      objective=config.objective,
      mechanism=plan.mechanism.name,
      batch=dict(expected_size=plan.expected_batch_size, capacity=plan.capacity,
                 num_microbatches=plan.num_microbatches, microbatch_size=plan.microbatch_size),
      parameters=sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
      flops_per_step=xla_flops(one) * plan.num_microbatches,
      flops_per_microbatch=xla_flops(one),
      bytes_per_device=dict(arguments=memory.argument_size_in_bytes,
                            outputs=memory.output_size_in_bytes,
                            temporaries=memory.temp_size_in_bytes,
                            aliased=memory.alias_size_in_bytes, total=total),
      mesh=dict(shape=dict(mesh.shape), platform=mesh.devices.flat[0].platform,
                device_kind=mesh.devices.flat[0].device_kind),
      device_memory_bytes=limit,
      fits=None if limit is None else total <= limit,
  )


def xla_flops(compiled) -> float:
  """The FLOPs XLA's cost analysis counts for a compiled program (loop bodies once)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", math.nan))


def _device_memory(device) -> int | None:
  """The device's memory in bytes, if its platform reports it."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # CPU and some backends do not say
    return None
  return None if not stats else stats.get("bytes_limit")
