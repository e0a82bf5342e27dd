"""`--mode=compile`: the full private step compiled on abstract inputs, without data."""

import json
import math

import jax
import jax.numpy as jnp

from dpvl import dry_run
from dpvl import objectives


def test_the_private_step_compiles_without_data_and_reports_its_cost(dpcap_config):
  config = dpcap_config()
  config.batch.microbatch_size = 128  # one micro-batch: one compilation
  report = dry_run.compile_step(config)
  params = objectives.build_objective(config).init(jax.random.key(0))
  assert report["parameters"] == sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  batch = report["batch"]
  assert batch["num_microbatches"] * batch["microbatch_size"] == batch["capacity"] >= 32
  assert batch["num_microbatches"] == 1
  assert report["flops_per_step"] == report["flops_per_microbatch"] * batch["num_microbatches"]
  assert report["flops_per_microbatch"] > 6 * report["parameters"] * batch["microbatch_size"]
  memory = report["bytes_per_device"]
  assert memory["arguments"] >= 4 * 3 * report["parameters"]  # params + Adam's two moments
  assert memory["total"] == (memory["arguments"] + memory["outputs"] + memory["temporaries"]
                             - memory["aliased"])
  assert report["mesh"]["shape"] == {"data": len(jax.devices())}
  json.dumps(report)  # printed as one JSON object


def test_xla_counts_a_loop_body_once_so_the_step_is_scaled_by_hand():
  """Why `flops_per_step` is a one-micro-batch step's FLOPs times the micro-batches: XLA's cost
  analysis of a scan over 8 micro-batches counts its body once."""
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)

  def scanned(n):
    body = lambda c, _: (c @ c, None)
    return jax.jit(lambda c: jax.lax.scan(body, c, None, length=n)[0]).lower(x).compile()

  assert 0 < dry_run.xla_flops(scanned(8)) < 1.01 * dry_run.xla_flops(scanned(1))
