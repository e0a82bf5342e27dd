"""Gaussian noise for the clipped gradient sum, drawn once per logical step.

Each step has its own key (`secrets.RunSecrets.noise_key`: never reused across steps,
micro-batches or segments of the ledger), split into one key per parameter leaf. The draw
depends only on the key and the leaf's global shape: JAX's threefry generator is partitionable
(`jax_threefry_partitionable`, on by default), so under a leaf's sharding each device generates
only its own shard of the noise, the values are the same whatever the mesh, and the replicas of
a parameter (along the data axis) draw identical noise and never diverge.
"""

import jax
import jax.numpy as jnp


def add_gaussian_noise(tree, key: jax.Array, std, shardings=None):
  """tree + N(0, std^2 I), leaf by leaf, in float32.

  Args:
    tree: a pytree of arrays (the clipped gradient sum).
    key: this step's noise key (`secrets.RunSecrets.noise_key`), split into one per leaf.
    std: the noise's standard deviation, sigma * C (a scalar).
    shardings: None, or a pytree of shardings shaped like `tree` (the parameters'): inside
      `jit`, each leaf's noise is drawn under its sharding, each device generating its shard.

  Returns:
    A float32 pytree shaped like `tree`.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  where = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)

  def noisy(x, k, sharding):
    draw = jax.random.normal(k, x.shape, jnp.float32)
    if sharding is not None:
      draw = jax.lax.with_sharding_constraint(draw, sharding)
    return x.astype(jnp.float32) + std * draw

  return jax.tree.unflatten(treedef, [noisy(*a) for a in zip(leaves, keys, where)])
