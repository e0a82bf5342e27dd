"""DP step vs non-private step for the demo model, measured in one run.

  python benchmarks/dp_overhead.py [--config=configs/dpcap_tiny.py] [--batches=64,256]

For each padded batch size, times the full train step (gradients, noise, AdamW update) with
per-example clipping (vmap) and without (plain gradient of the summed loss), on the same
micro-batching, and prints both times and their ratio.
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dpvl import optim
from dpvl import train  # pylint: disable=wrong-import-position
from dpvl.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position
from dpvl.objectives import build_objective  # pylint: disable=wrong-import-position
from dpvl.privacy import plan as plan_lib  # pylint: disable=wrong-import-position


def _load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _time(fn, *args, repeats):
  out = fn(*args)  # compile
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..",
                                                       "configs", "dpcap_tiny.py"))
  parser.add_argument("--batches", default="64,256")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = _load_config(args.config)
  objective = build_objective(config)
  source = sources.build_source(config.data)
  micro = config.batch.microbatch_size
  params = objective.init(jax.random.key(0))
  base_plan = plan_lib.build_plan(config)  # only its clip norm and noise matter here
  print(f"devices: {jax.devices()}  model parameters: "
        f"{sum(x.size for x in jax.tree.leaves(params)):,}  micro-batch {micro}")
  print(f"{'batch':>6} {'non-private s':>14} {'DP (vmap) s':>12} {'ratio':>6}")
  for batch_size in (int(b) for b in args.batches.split(",")):
    num_micro = -(-batch_size // micro)
    examples = [objective.prepare(source[i]) for i in range(num_micro * micro)]
    batch = {k: jnp.stack([e[k] for e in examples]).reshape(num_micro, micro, *v.shape)
             for k, v in examples[0].items()}
    mask = jnp.ones((num_micro, micro), bool)
    results = {}
    for enabled in (False, True):
      plan = dataclasses.replace(base_plan, enabled=enabled, expected_batch_size=batch_size,
                                 num_microbatches=num_micro)
      optimizer = optim.make_optimizer(optim.settings(config), 100)
      step = jax.jit(train.make_train_step(plan.mechanism.gradient(objective), optimizer, plan))
      state = dict(params=params, opt_state=optimizer.init(params),
                   step=jnp.zeros((), jnp.int32))
      keys = (jax.random.key(1), jax.random.key(2))
      results[enabled] = _time(step, state, batch, mask, *keys, repeats=args.repeats)
    print(f"{batch_size:>6} {results[False]:>14.4f} {results[True]:>12.4f} "
          f"{results[True] / results[False]:>6.2f}")


if __name__ == "__main__":
  main()
