"""Per-example gradients, clipping, padding and non-finite examples of the DP engine."""

import jax
import jax.numpy as jnp
import numpy as np

from dpvl.privacy import clipping
from tests.privacy import mlp


def test_per_example_grads_match_brute_force_loop():
  params, batch, rngs = mlp.make(scale=3.0)
  mask = np.ones((3, 4), bool)
  mask[2, 1:] = False
  for clip_norm in (0.05, 1.0, 1e6):  # heavy clipping, mixed, none
    got, stats = clipping.clipped_grad_sum(mlp.loss, params, batch, jnp.asarray(mask), rngs,
                                           clip_norm)
    want = mlp.loop_clipped_sum(params, batch, rngs, mask, clip_norm)
    mlp.assert_close(mlp.flat(got), want)
    assert int(stats["nonfinite"]) == 0


def test_unclipped_norms_match_loop():
  params, batch, rngs = mlp.make()
  per_example = jax.vmap(jax.grad(mlp.loss), in_axes=(None, 0, 0))(
      params, jax.tree.map(lambda x: x[0], batch), rngs[0])
  norms = clipping.global_norms(per_example)
  for j in range(4):
    g = jax.grad(mlp.loss)(params, jax.tree.map(lambda x, j=j: x[0, j], batch), rngs[0, j])
    np.testing.assert_allclose(norms[j], np.linalg.norm(mlp.flat(g)), rtol=1e-5)


def test_every_clipped_norm_is_at_most_c():
  params, batch, rngs = mlp.make(scale=10.0)
  example = jax.tree.map(lambda x: x[0], batch)
  grads = jax.vmap(jax.grad(mlp.loss), in_axes=(None, 0, 0))(params, example, rngs[0])
  for clip_norm in (1e-3, 0.1, 1.0, 10.0):
    clipped, stats = clipping.clip(grads, jnp.ones(4, bool), clip_norm)
    norms = np.asarray(clipping.global_norms(clipped))
    assert np.all(norms <= clip_norm * (1 + 1e-6)), norms
    # Unclipped examples keep their gradient; clipped ones land on the sphere.
    before = np.asarray(stats["norms"])
    np.testing.assert_allclose(norms, np.minimum(before, clip_norm), rtol=1e-5)


def test_padded_examples_change_nothing():
  params, batch, rngs = mlp.make()
  mask = np.ones((3, 4), bool)
  mask[1, 2:] = False
  mask[2, :] = False
  base, _ = clipping.clipped_grad_sum(mlp.loss, params, batch, jnp.asarray(mask), rngs, 1.0)
  # Replace padded slots by garbage, including NaN and huge values: nothing may change.
  garbage = dict(x=np.asarray(batch["x"]).copy(), y=np.asarray(batch["y"]).copy())
  garbage["x"][~mask] = np.nan
  garbage["y"][~mask] = 1e30
  other, _ = clipping.clipped_grad_sum(mlp.loss, params, garbage, jnp.asarray(mask), rngs, 1.0)
  np.testing.assert_array_equal(mlp.flat(base), mlp.flat(other))
  # And it equals the sum over the valid examples only, computed without padding.
  want = mlp.loop_clipped_sum(params, batch, rngs, mask, 1.0)
  mlp.assert_close(mlp.flat(base), want)


def test_nonfinite_example_contributes_zero_and_is_counted():
  params, batch, rngs = mlp.make()
  mask = np.ones((3, 4), bool)
  bad = dict(x=np.asarray(batch["x"]).copy(), y=np.asarray(batch["y"]).copy())
  bad["x"][0, 0] = np.inf
  got, stats = clipping.clipped_grad_sum(mlp.loss, params, bad, jnp.asarray(mask), rngs, 1.0)
  mask_without = mask.copy()
  mask_without[0, 0] = False
  want = mlp.loop_clipped_sum(params, batch, rngs, mask_without, 1.0)
  assert np.all(np.isfinite(mlp.flat(got)))
  mlp.assert_close(mlp.flat(got), want)
  assert int(stats["nonfinite"]) == 1


def test_microbatching_does_not_change_the_sum():
  params, batch, rngs = mlp.make(num_micro=4, micro=6)
  mask = jnp.ones((4, 6), bool)
  a, _ = clipping.clipped_grad_sum(mlp.loss, params, batch, mask, rngs, 0.5)
  regroup = lambda x: x.reshape(2, 12, *x.shape[2:])
  b, _ = clipping.clipped_grad_sum(mlp.loss, params, jax.tree.map(regroup, batch),
                                   regroup(mask), regroup(rngs), 0.5)
  np.testing.assert_allclose(mlp.flat(a), mlp.flat(b), rtol=1e-5, atol=1e-6)


def test_non_private_sum_is_the_plain_gradient():
  params, batch, rngs = mlp.make()
  mask = np.ones((3, 4), bool)
  mask[2, 3] = False
  got, _ = clipping.grad_sum(mlp.loss, params, batch, jnp.asarray(mask), rngs)
  want = mlp.loop_clipped_sum(params, batch, rngs, mask, np.inf)
  mlp.assert_close(mlp.flat(got), want)
