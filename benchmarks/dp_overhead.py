"""The cost of privacy, measured in one run: non-private vs vmap vs ghost clipping.

  python benchmarks/dp_overhead.py                      # the three demo models, batch 64 and 256
  python benchmarks/dp_overhead.py --cases=dpcap_vitb16 # ViT-B/16 DP-Cap, 224 px, batch 2 and 4
  python benchmarks/dp_overhead.py --json               # one JSON object per row

For each model and micro-batch size, times the full train step (gradient, noise, AdamW update)
three ways on the same batch: without privacy (the gradient of the summed loss), with
per-example gradients by `vmap`, and with book-keeping `ghost` clipping; and reads each
compiled step's temporary memory (`compile().memory_analysis()`). Prints the median step time,
its ratio to the non-private step, the temporary bytes and their ratio. A row's batch is
`--accumulate` micro-batches.
"""

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# pylint: disable=wrong-import-position
from dpvl import optim
from dpvl import train
from dpvl.data import sources
from dpvl.objectives import build_objective
from dpvl.privacy import plan as plan_lib

# name: (config module, micro-batch sizes, what to change for the case)
CASES = {
    "dpcap_tiny": ("configs.dpcap_tiny", (64, 256), {}),
    "vip_tiny": ("configs.vip_tiny", (64, 256), {}),
    "dpclip_tiny": ("configs.dpclip_tiny", (64, 256), {"privacy.mechanism": "per_batch"}),
    # ViT-B/16 at 224 px and the paper's 6-layer decoder, a BERT-sized vocabulary.
    "dpcap_vitb16": ("configs.dpcap_laion233m", (2, 4), {"model.dtype": "float32"}),
}
STRATEGIES = ("non-private", "vmap", "ghost")


def _config(name: str, microbatch: int, accumulate: int, vocab_dir: str):
  module, _, changes = CASES[name]
  config = importlib.import_module(module).get_config()
  if name == "dpcap_vitb16":  # generated 224-pixel scenes; a vocabulary of BERT's size
    config.data = importlib.import_module("configs.common").scene_data(size=1_000)
    config.data.image_size = 224
    vocab = os.path.join(vocab_dir, "vocab.txt")
    with open(vocab, "w") as f:
      f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                        [f"w{i}" for i in range(30_522 - 4)]) + "\n")
    config.tokenizer.vocab_file = vocab
  for field, value in changes.items():
    section, key = field.split(".")
    config[section][key] = value
  config.batch.microbatch_size = microbatch
  config.batch.expected_size = microbatch * accumulate
  config.privacy.group_size = microbatch  # per_batch: one group per micro-batch
  config.privacy.noise_multiplier, config.privacy.target_epsilon = 1.0, None
  config.data.size = max(config.data.size, 20 * microbatch * accumulate)
  return config


def _batch(objective, source, accumulate: int, microbatch: int):
  n = accumulate * microbatch
  examples = [objective.prepare(source[i % len(source)]) for i in range(min(n, 64))]
  examples = [examples[i % len(examples)] for i in range(n)]
  return {k: jnp.asarray(np.stack([e[k] for e in examples]).reshape(accumulate, microbatch,
                                                                      *v.shape))
          for k, v in examples[0].items()}


def measure(name: str, microbatch: int, accumulate: int, repeats: int, vocab_dir: str):
  """The rows of one case and micro-batch size: one per strategy."""
  config = _config(name, microbatch, accumulate, vocab_dir)
  objective = build_objective(config)
  source = sources.build_source(config.data)
  batch = _batch(objective, source, accumulate, microbatch)
  mask = jnp.ones((accumulate, microbatch), bool)
  params = objective.init(jax.random.key(0))
  base = plan_lib.build_plan(config)
  optimizer = optim.make_optimizer(optim.settings(config), 100)
  state = dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
  keys = (jax.random.key(1), jax.random.key(2))
  compiled, temps = {}, {}
  for strategy in STRATEGIES:
    mechanism = base.mechanism
    if strategy != "non-private":
      mechanism = dataclasses.replace(mechanism, clipping=strategy)
    plan = dataclasses.replace(base, enabled=strategy != "non-private", mechanism=mechanism,
                               expected_batch_size=accumulate * microbatch,
                               num_microbatches=accumulate, microbatch_size=microbatch)
    step = train.make_train_step(mechanism.gradient(objective), optimizer, plan)
    compiled[strategy] = jax.jit(step).lower(state, batch, mask, *keys).compile()
    temps[strategy] = compiled[strategy].memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled[strategy](state, batch, mask, *keys))  # warm
  times = {strategy: [] for strategy in STRATEGIES}
  for _ in range(repeats):  # round-robin: a slow spell of the machine hits every strategy
    for strategy in STRATEGIES:
      start = time.perf_counter()
      jax.block_until_ready(compiled[strategy](state, batch, mask, *keys))
      times[strategy].append(time.perf_counter() - start)
  rows = [dict(objective=objective.name, model=name, batch=accumulate * microbatch,
               microbatch=microbatch, strategy=strategy,
               seconds=statistics.median(times[strategy]), temp_bytes=int(temps[strategy]))
          for strategy in STRATEGIES]
  for row in rows:
    row["ratio"] = row["seconds"] / rows[0]["seconds"]
    row["memory_ratio"] = row["temp_bytes"] / max(rows[0]["temp_bytes"], 1)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="dpcap_tiny,vip_tiny,dpclip_tiny",
                      help=f"comma-separated, of {sorted(CASES)}")
  parser.add_argument("--microbatches", default="",
                      help="comma-separated micro-batch sizes (default: the case's)")
  parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--json", action="store_true", help="one JSON object per row")
  args = parser.parse_args()
  if not args.json:
    print(f"devices: {jax.devices()}")
    print(f"{'model':>13} {'batch':>6} {'micro':>6} {'strategy':>12} {'seconds':>9} "
          f"{'ratio':>6} {'temp MiB':>9} {'mem ratio':>9}")
  with tempfile.TemporaryDirectory() as vocab_dir:
    for name in args.cases.split(","):
      sizes = ([int(m) for m in args.microbatches.split(",")] if args.microbatches
               else CASES[name][1])
      for microbatch in sizes:
        for row in measure(name, microbatch, args.accumulate, args.repeats, vocab_dir):
          if args.json:
            print(json.dumps(row), flush=True)
          else:
            print(f"{row['model']:>13} {row['batch']:>6} {row['microbatch']:>6} "
                  f"{row['strategy']:>12} {row['seconds']:>9.4f} {row['ratio']:>6.2f} "
                  f"{row['temp_bytes'] / 2**20:>9.1f} {row['memory_ratio']:>9.2f}", flush=True)


if __name__ == "__main__":
  main()
