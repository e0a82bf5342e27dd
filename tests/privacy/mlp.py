"""A small non-linear per-example loss and padded batches of it, with a brute-force
reference, for the tests of the DP engine (test_clipping.py, test_dpsgd.py)."""

import jax
import jax.numpy as jnp
import numpy as np


def loss(params, example, rng):
  """A small non-linear per-example loss with randomness, like a real objective."""
  h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
  dropout = jax.random.bernoulli(rng, 0.8, h.shape)
  out = (h * dropout) @ params["w2"]
  return jnp.mean((out - example["y"]) ** 2)


def make(num_micro=3, micro=4, seed=0, scale=1.0):
  """(params, batch [num_micro, micro, ...], per-example rngs) of the loss above."""
  k = jax.random.split(jax.random.key(seed), 6)
  params = dict(w1=jax.random.normal(k[0], (5, 7)), b1=jnp.zeros(7),
                w2=jax.random.normal(k[1], (7, 2)))
  n = num_micro * micro
  batch = dict(x=scale * jax.random.normal(k[2], (num_micro, micro, 5)),
               y=jax.random.normal(k[3], (num_micro, micro, 2)))
  rngs = jax.random.split(k[4], n).reshape(num_micro, micro)
  return params, batch, rngs


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def assert_close(got, want):
  """float32 sums against a float64 loop: tolerance relative to the largest coordinate."""
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))


def loop_clipped_sum(params, batch, rngs, mask, clip_norm):
  """Brute force: one jax.grad per example, clipped with numpy, summed in float64."""
  total = 0.0
  for i in range(mask.shape[0]):
    for j in range(mask.shape[1]):
      if not mask[i, j]:
        continue
      example = jax.tree.map(lambda x, i=i, j=j: x[i, j], batch)
      g = flat(jax.grad(loss)(params, example, rngs[i, j])).astype(np.float64)
      total = total + g * min(1.0, clip_norm / np.linalg.norm(g))
  return total
