"""DP-CLIP: per-batch and Logit-DP train steps vs the non-private step, measured in one run.

  python benchmarks/contrastive_step.py [--config=configs/dpclip_tiny.py] [--batch=256]
      [--embed_dims=8,32] [--group_size=64] [--microbatch=32]

On the same real (unpadded) batch of generated captioned scenes, times the full train step
(gradient, noise, AdamW) of: the non-private contrastive loss over the whole batch, per-batch
clipping (groups of `group_size`), and Logit-DP with exact pair norms and with the
eigenvalue bound; prints seconds and the ratio to the non-private step, per embedding width.
"""

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from dp_overhead import _load_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from dp_overhead import _time  # pylint: disable=g-import-not-at-top,wrong-import-position

from dpvl import optim
from dpvl import train  # pylint: disable=wrong-import-position
from dpvl.data import sources  # pylint: disable=wrong-import-position
from dpvl.objectives import build_objective  # pylint: disable=wrong-import-position
from dpvl.privacy import plan as plan_lib  # pylint: disable=wrong-import-position


def _batch(objective, source, rows, cols):
  examples = [objective.prepare(source[i]) for i in range(rows * cols)]
  return {k: jnp.stack([e[k] for e in examples]).reshape(rows, cols, *v.shape)
          for k, v in examples[0].items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..",
                                                       "configs", "dpclip_tiny.py"))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--embed_dims", default="8,32")
  parser.add_argument("--group_size", type=int, default=64)
  parser.add_argument("--microbatch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  config = _load_config(args.config)
  config.privacy.update(noise_multiplier=1.0, target_epsilon=None)
  config.batch.update(expected_size=args.batch, microbatch_size=args.microbatch)
  config.privacy.group_size = args.group_size
  source = sources.build_source(config.data)
  print(f"devices: {jax.devices()}  batch {args.batch}  micro-batch {args.microbatch}  "
        f"group size {args.group_size}")
  print(f"{'embed':>5} {'step':>22} {'seconds':>8} {'ratio':>6}")
  for dim in (int(d) for d in args.embed_dims.split(",")):
    config.model.embed_dim = dim
    objective = build_objective(config)
    params = objective.init(jax.random.key(0))
    optimizer = optim.make_optimizer(optim.settings(config), 100)
    state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
    runs = {"non-private": ("logit_dp", False, args.microbatch, "exact"),
            "per_batch": ("per_batch", True, args.group_size, "exact"),
            "logit_dp (exact)": ("logit_dp", True, args.microbatch, "exact"),
            "logit_dp (bound)": ("logit_dp", True, args.microbatch, "bound")}
    base = None
    for name, (mechanism, enabled, cols, how) in runs.items():
      config.privacy.mechanism = mechanism
      config.privacy.pair_norms = how
      plan = dataclasses.replace(plan_lib.build_plan(config), enabled=enabled)
      rows = args.batch // cols
      batch, mask = _batch(objective, source, rows, cols), jnp.ones((rows, cols), bool)
      step = jax.jit(train.make_train_step(plan.mechanism.gradient(objective), optimizer,
                                           plan))
      seconds = _time(step, state, batch, mask, jax.random.key(1), jax.random.key(2),
                      repeats=args.repeats)
      base = base or seconds
      print(f"{dim:>5} {name:>22} {seconds:>8.3f} {seconds / base:>6.2f}")


if __name__ == "__main__":
  main()
