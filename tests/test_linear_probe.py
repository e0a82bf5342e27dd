"""The linear probe learns separable features and is at chance on uninformative ones."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.evaluate import linear_probe


def _blobs(n, num_classes, dim, separation, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * separation
  y = rng.integers(num_classes, size=n)
  return centres[y] + rng.normal(size=(n, dim)), y


def test_probe_separates_clusters_and_is_at_chance_on_noise():
  x, y = _blobs(1200, 5, 16, separation=3.0, seed=0)
  good = linear_probe.fit_linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], 5, steps=300)
  assert good.test_accuracy > 0.95
  noise = np.random.default_rng(1).normal(size=x.shape)
  bad = linear_probe.fit_linear_probe(noise[:1000], y[:1000], noise[1000:], y[1000:], 5,
                                      steps=300)
  assert bad.test_accuracy < 0.35  # chance is 0.2; 200 test points


def test_mean_pooled_blocks():
  blocks = [jnp.full((2, 3, 4), float(i)) for i in range(4)]
  out = linear_probe.mean_pooled_blocks(blocks, 2)
  assert out.shape == (2, 8)
  np.testing.assert_array_equal(out[0], [2.0] * 4 + [3.0] * 4)
  with pytest.raises(ValueError):
    linear_probe.mean_pooled_blocks(blocks, 5)
