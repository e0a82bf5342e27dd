"""Poisson batch selection in O(expected batch size), padded to a fixed shape.

Poisson sampling puts each of N records in a step's batch independently with probability q.
`PoissonSampler` draws the same distribution without touching all N records:

  1. draw the batch size K ~ Binomial(N, q);
  2. draw K distinct indices uniformly at random (a uniformly random K-subset).

Why this is exact: under independent inclusion a given subset S has probability
q^|S| (1-q)^(N-|S|), which depends on S only through |S| = k. So P(|S| = k) =
C(N, k) q^k (1-q)^(N-k), which is Binomial(N, q), and given |S| = k every k-subset is equally
likely, probability 1 / C(N, k). Steps 1 and 2 draw exactly this pair, so
P(S) = Binomial(N, q)(k) / C(N, k) = q^k (1-q)^(N-k).

numpy's `Generator.choice(N, K, replace=False)` draws the K-subset in O(K) time and memory for
K << N (Floyd's algorithm with a hash set; measured: q up to about 2%, which covers the paper
runs at 0.56% and 0.04%; above that numpy permutes all N, still exact but O(N)) and returns it
in uniformly random order. `benchmarks/sampler.py` times it at N = 233M.

Fixed shapes: the batch is padded to `capacity` slots with a mask. If K > capacity, the first
`capacity` of the randomly ordered indices are kept: a uniformly random subset, exactly the
truncated Poisson mechanism that `accounting` accounts for. The plan sizes `capacity` so that
this is negligible (`accounting.min_capacity`).

The selection of step t is a pure function of (seed, t): any host can compute it, and the only
sampler state a checkpoint needs is the seed and the step. On H hosts every host computes the
whole selection (O(expected batch), no communication) and reads only its share of it
(`dpvl.parallel.mesh.host_slots`, `Selection.take`). The seed must be secret (the adversary
must not know who was sampled); `train` draws it from the OS by default.
"""

import dataclasses

import numpy as np

_STREAM = 0x5A3D  # separates the sampler's random stream from other uses of the same seed


@dataclasses.dataclass(frozen=True)
class Selection:
  """One step's batch: `indices[i]` is a record where `mask[i]`, padding elsewhere (index 0)."""

  indices: np.ndarray   # int64 [capacity]
  mask: np.ndarray      # bool [capacity]
  poisson_size: int     # K, the size drawn before truncation
  truncated: int        # records dropped because K > capacity

  @property
  def size(self) -> int:
    return int(self.mask.sum())

  def take(self, slots: np.ndarray) -> "Selection":
    """The slots `slots` of this selection (e.g. one host's share); sizes stay global."""
    return dataclasses.replace(self, indices=self.indices[slots], mask=self.mask[slots])


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson sampling of each step's batch from records 0..N-1: each joins independently with
  probability `sampling_rate`; a batch larger than `capacity` slots is truncated (see the
  module docstring). `seed` is the run's secret sampler seed (`secrets.RunSecrets`)."""

  dataset_size: int
  sampling_rate: float
  capacity: int
  seed: int

  def __post_init__(self):
    if not 0 <= self.sampling_rate <= 1:
      raise ValueError(f"sampling rate must be in [0, 1], got {self.sampling_rate}.")
    if self.capacity < 1:
      raise ValueError(f"capacity must be positive, got {self.capacity}.")

  def select(self, step: int) -> Selection:
    """The batch of step `step` (deterministic given seed and step).

    >>> sampler = PoissonSampler(dataset_size=1_000, sampling_rate=0.05, capacity=64, seed=7)
    >>> batch = sampler.select(3)
    >>> batch.indices.shape, batch.size == batch.poisson_size - batch.truncated
    ((64,), True)
    >>> bool((batch.indices[batch.size:] == 0).all())  # padding after the records, masked
    True
    >>> bool((sampler.select(3).indices == batch.indices).all())  # a function of (seed, step)
    True
    """
    rng = np.random.default_rng([self.seed, _STREAM, step])
    k = int(rng.binomial(self.dataset_size, self.sampling_rate))
    chosen = rng.choice(self.dataset_size, size=k, replace=False)
    kept = chosen[:self.capacity]
    indices = np.zeros(self.capacity, np.int64)
    indices[:kept.size] = kept
    mask = np.zeros(self.capacity, bool)
    mask[:kept.size] = True
    return Selection(indices, mask, poisson_size=k, truncated=k - kept.size)
