"""The Poisson sampler against its accounting model: Binomial sizes, uniform inclusion."""

import numpy as np
import pytest
from scipy import stats

from dpvl.privacy import sampling


def test_batch_sizes_follow_binomial():
  n, q, steps = 2_000, 0.02, 3_000
  sampler = sampling.PoissonSampler(n, q, capacity=n, seed=7)
  sizes = np.array([sampler.select(t).size for t in range(steps)])
  # Chi-square goodness of fit over size bins with enough expected mass.
  edges = np.arange(20, 62, 3)
  observed = np.array([np.sum((sizes >= a) & (sizes < b)) for a, b in zip(edges, edges[1:])])
  cdf = stats.binom.cdf(edges - 1, n, q)
  expected = steps * np.diff(cdf)
  rest = steps - observed.sum(), steps - expected.sum()
  chi2 = stats.chisquare(np.append(observed, rest[0]), np.append(expected, rest[1]))
  assert chi2.pvalue > 1e-4, chi2
  assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / steps)


def test_inclusion_is_uniform_and_independent():
  n, q, steps = 500, 0.1, 4_000
  sampler = sampling.PoissonSampler(n, q, capacity=n, seed=3)
  counts = np.zeros(n)
  pair = 0  # how often records 0 and 1 are in the same batch
  for t in range(steps):
    s = sampler.select(t)
    chosen = s.indices[s.mask]
    assert len(np.unique(chosen)) == len(chosen)
    counts[chosen] += 1
    pair += (0 in chosen) and (1 in chosen)
  # Each record's count is Binomial(steps, q): chi-square of counts against that.
  var = steps * q * (1 - q)
  z = (counts - steps * q) / np.sqrt(var)
  chi2 = np.sum(z ** 2)
  assert stats.chi2.sf(chi2, n) > 1e-4 and stats.chi2.cdf(chi2, n) > 1e-4
  assert abs(pair - steps * q * q) < 6 * np.sqrt(steps * q * q)


def test_selection_is_deterministic_per_seed_and_step():
  a = sampling.PoissonSampler(10_000, 0.01, 256, seed=1)
  b = sampling.PoissonSampler(10_000, 0.01, 256, seed=1)
  c = sampling.PoissonSampler(10_000, 0.01, 256, seed=2)
  np.testing.assert_array_equal(a.select(5).indices, b.select(5).indices)
  assert not np.array_equal(a.select(5).indices, a.select(6).indices)
  assert not np.array_equal(a.select(5).indices, c.select(5).indices)


def test_padding_and_truncation():
  sampler = sampling.PoissonSampler(1_000, 0.5, capacity=400, seed=0)
  s = sampler.select(0)
  assert s.indices.shape == (400,) and s.mask.shape == (400,)
  assert s.poisson_size > 400 and s.truncated == s.poisson_size - 400 and s.size == 400
  roomy = sampling.PoissonSampler(1_000, 0.05, capacity=128, seed=0).select(0)
  assert roomy.truncated == 0 and roomy.size == roomy.poisson_size
  assert not roomy.mask[roomy.size:].any() and roomy.mask[:roomy.size].all()


def test_bad_arguments():
  with pytest.raises(ValueError):
    sampling.PoissonSampler(10, 1.5, 4, 0)
  with pytest.raises(ValueError):
    sampling.PoissonSampler(10, 0.5, 0, 0)

