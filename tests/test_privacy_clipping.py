"""Per-example gradients, clipping, padding and non-finite examples of the DP engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.privacy import clipping
from dpvl.privacy import dpsgd


def _mlp_loss(params, example, rng):
  """A small non-linear per-example loss with randomness, like a real objective."""
  h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
  dropout = jax.random.bernoulli(rng, 0.8, h.shape)
  out = (h * dropout) @ params["w2"]
  return jnp.mean((out - example["y"]) ** 2)


def _setup(num_micro=3, micro=4, seed=0, scale=1.0):
  k = jax.random.split(jax.random.key(seed), 6)
  params = dict(w1=jax.random.normal(k[0], (5, 7)), b1=jnp.zeros(7),
                w2=jax.random.normal(k[1], (7, 2)))
  n = num_micro * micro
  batch = dict(x=scale * jax.random.normal(k[2], (num_micro, micro, 5)),
               y=jax.random.normal(k[3], (num_micro, micro, 2)))
  rngs = jax.random.split(k[4], n).reshape(num_micro, micro)
  return params, batch, rngs


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _assert_close(got, want):
  """float32 sums against a float64 loop: tolerance relative to the largest coordinate."""
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))


def _loop_clipped_sum(params, batch, rngs, mask, clip_norm):
  """Brute force: one jax.grad per example, clipped with numpy, summed in float64."""
  total = 0.0
  for i in range(mask.shape[0]):
    for j in range(mask.shape[1]):
      if not mask[i, j]:
        continue
      example = jax.tree.map(lambda x: x[i, j], batch)
      g = _flat(jax.grad(_mlp_loss)(params, example, rngs[i, j])).astype(np.float64)
      total = total + g * min(1.0, clip_norm / np.linalg.norm(g))
  return total


def test_per_example_grads_match_brute_force_loop():
  params, batch, rngs = _setup(scale=3.0)
  mask = np.ones((3, 4), bool)
  mask[2, 1:] = False
  for clip_norm in (0.05, 1.0, 1e6):  # heavy clipping, mixed, none
    got, stats = clipping.clipped_grad_sum(_mlp_loss, params, batch, jnp.asarray(mask), rngs,
                                           clip_norm)
    want = _loop_clipped_sum(params, batch, rngs, mask, clip_norm)
    _assert_close(_flat(got), want)
    assert int(stats["nonfinite"]) == 0


def test_unclipped_norms_match_loop():
  params, batch, rngs = _setup()
  per_example = jax.vmap(jax.grad(_mlp_loss), in_axes=(None, 0, 0))(
      params, jax.tree.map(lambda x: x[0], batch), rngs[0])
  norms = clipping.global_norms(per_example)
  for j in range(4):
    g = jax.grad(_mlp_loss)(params, jax.tree.map(lambda x: x[0, j], batch), rngs[0, j])
    np.testing.assert_allclose(norms[j], np.linalg.norm(_flat(g)), rtol=1e-5)


def test_every_clipped_norm_is_at_most_c():
  params, batch, rngs = _setup(scale=10.0)
  example = jax.tree.map(lambda x: x[0], batch)
  grads = jax.vmap(jax.grad(_mlp_loss), in_axes=(None, 0, 0))(params, example, rngs[0])
  for clip_norm in (1e-3, 0.1, 1.0, 10.0):
    clipped, stats = clipping.clip(grads, jnp.ones(4, bool), clip_norm)
    norms = np.asarray(clipping.global_norms(clipped))
    assert np.all(norms <= clip_norm * (1 + 1e-6)), norms
    # Unclipped examples keep their gradient; clipped ones land on the sphere.
    before = np.asarray(stats["norms"])
    np.testing.assert_allclose(norms, np.minimum(before, clip_norm), rtol=1e-5)


def test_padded_examples_change_nothing():
  params, batch, rngs = _setup()
  mask = np.ones((3, 4), bool)
  mask[1, 2:] = False
  mask[2, :] = False
  base, _ = clipping.clipped_grad_sum(_mlp_loss, params, batch, jnp.asarray(mask), rngs, 1.0)
  # Replace padded slots by garbage, including NaN and huge values: nothing may change.
  garbage = dict(x=np.asarray(batch["x"]).copy(), y=np.asarray(batch["y"]).copy())
  garbage["x"][~mask] = np.nan
  garbage["y"][~mask] = 1e30
  other, _ = clipping.clipped_grad_sum(_mlp_loss, params, garbage, jnp.asarray(mask), rngs, 1.0)
  np.testing.assert_array_equal(_flat(base), _flat(other))
  # And it equals the sum over the valid examples only, computed without padding.
  want = _loop_clipped_sum(params, batch, rngs, mask, 1.0)
  _assert_close(_flat(base), want)


def test_nonfinite_example_contributes_zero_and_is_counted():
  params, batch, rngs = _setup()
  mask = np.ones((3, 4), bool)
  bad = dict(x=np.asarray(batch["x"]).copy(), y=np.asarray(batch["y"]).copy())
  bad["x"][0, 0] = np.inf
  got, stats = clipping.clipped_grad_sum(_mlp_loss, params, bad, jnp.asarray(mask), rngs, 1.0)
  mask_without = mask.copy()
  mask_without[0, 0] = False
  want = _loop_clipped_sum(params, batch, rngs, mask_without, 1.0)
  assert np.all(np.isfinite(_flat(got)))
  _assert_close(_flat(got), want)
  assert int(stats["nonfinite"]) == 1


def test_microbatching_does_not_change_the_sum():
  params, batch, rngs = _setup(num_micro=4, micro=6)
  mask = jnp.ones((4, 6), bool)
  a, _ = clipping.clipped_grad_sum(_mlp_loss, params, batch, mask, rngs, 0.5)
  regroup = lambda x: x.reshape(2, 12, *x.shape[2:])
  b, _ = clipping.clipped_grad_sum(_mlp_loss, params, jax.tree.map(regroup, batch),
                                   regroup(mask), regroup(rngs), 0.5)
  np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-5, atol=1e-6)


def test_non_private_sum_is_the_plain_gradient():
  params, batch, rngs = _setup()
  mask = np.ones((3, 4), bool)
  mask[2, 3] = False
  got, _ = clipping.grad_sum(_mlp_loss, params, batch, jnp.asarray(mask), rngs)
  want = _loop_clipped_sum(params, batch, rngs, mask, np.inf)
  _assert_close(_flat(got), want)


def _zero_grad_loss(params, example, rng):
  del rng
  return 0.0 * jnp.sum(params["w"]) + jnp.sum(example["x"])


@pytest.mark.parametrize("num_micro", [1, 8])
def test_noise_std_is_sigma_c_once_per_step(num_micro):
  """The noise on the sum has std sigma*C whatever the micro-batching (drawn once per step)."""
  n = 200_000
  params = dict(w=jnp.zeros(n))
  batch = dict(x=jnp.zeros((num_micro, 2)))
  mask = jnp.ones((num_micro, 2), bool)
  rngs = jax.random.split(jax.random.key(0), 2 * num_micro).reshape(num_micro, 2)
  sigma, c, b = 0.7, 2.5, 64
  grad, _ = dpsgd.private_gradient(_zero_grad_loss, params, batch, mask, rngs,
                                   jax.random.key(1), clip_norm=c, noise_std=sigma * c,
                                   expected_batch_size=b)
  noise = np.asarray(grad["w"], np.float64) * b  # undo the division by the expected size
  # The sample std of n normals has standard error std / sqrt(2 n): allow 6 of them.
  tol = 6 * sigma * c / np.sqrt(2 * n)
  assert abs(noise.std() - sigma * c) < tol, (noise.std(), sigma * c, tol)
  assert abs(noise.mean()) < 6 * sigma * c / np.sqrt(n)




def test_gradient_is_divided_by_expected_not_realised_batch_size():
  params, batch, rngs = _setup()
  mask = np.ones((3, 4), bool)
  mask[0, :2] = False  # realised 10
  kwargs = dict(clip_norm=1.0, noise_std=0.0)
  g, metrics = dpsgd.private_gradient(_mlp_loss, params, batch, jnp.asarray(mask), rngs,
                                      jax.random.key(0), expected_batch_size=40, **kwargs)
  total, _ = clipping.clipped_grad_sum(_mlp_loss, params, batch, jnp.asarray(mask), rngs, 1.0)
  np.testing.assert_allclose(_flat(g), _flat(total) / 40, rtol=1e-6)
  assert int(metrics["examples"]) == 10
