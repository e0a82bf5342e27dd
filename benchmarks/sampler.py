"""Time of one step's Poisson selection at paper scale (N = 233M), on one core.

  python benchmarks/sampler.py [--steps=5]

Prints, for the expected batches of DP-Cap (1,310,720) and ViP (98,304), the mean and worst
seconds of `PoissonSampler.select(step)` and of one host's share of it (`host_slots`), which
is what every host of a pod computes each step.
"""

import argparse
import time

import numpy as np

from dpvl.parallel import mesh as mesh_lib
from dpvl.privacy import sampling

N = 233_000_000
BATCHES = {"DP-Cap": 1_310_720, "ViP": 98_304}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--hosts", type=int, default=16)
  args = parser.parse_args()
  for name, batch in BATCHES.items():
    q = batch / N
    capacity = int(batch * 1.01) // (args.hosts * 64) * (args.hosts * 64) + args.hosts * 64
    sampler = sampling.PoissonSampler(N, q, capacity=capacity, seed=0)
    times, sizes = [], []
    for step in range(args.steps):
      t = time.perf_counter()
      selection = sampler.select(step)
      times.append(time.perf_counter() - t)
      sizes.append(selection.poisson_size)
    t = time.perf_counter()
    slots = mesh_lib.host_slots(capacity // (args.hosts * 64), args.hosts * 64, 0, args.hosts)
    selection.take(slots)
    share = time.perf_counter() - t
    print(f"{name}: N={N:,} q={q:.6g} expected batch {batch:,} (drawn {np.mean(sizes):,.0f}): "
          f"select {np.mean(times):.3f} s mean, {np.max(times):.3f} s worst over {args.steps} "
          f"steps; + one host's share of {args.hosts}: {share:.4f} s")


if __name__ == "__main__":
  main()
