"""Gaussian noise for the clipped gradient sum, drawn once per logical step.

Each step has its own key (`secrets.RunSecrets.noise_key`: never reused across steps,
micro-batches or segments of the ledger), split into one key per parameter leaf. The train
state is replicated on every device (`dpvl.parallel.mesh`); the draw depends only on the key and
the leaf's global shape (JAX's counter-based generator), so every replica computes the same
noise and replicas of a parameter never diverge.
"""

import jax
import jax.numpy as jnp


def add_gaussian_noise(tree, key: jax.Array, std):
  """tree + N(0, std^2 I), leaf by leaf, in float32.

  Args:
    tree: a pytree of arrays (the clipped gradient sum), replicated on every device.
    key: this step's noise key (`secrets.RunSecrets.noise_key`), split into one per leaf.
    std: the noise's standard deviation, sigma * C (a scalar).

  Returns:
    A float32 pytree shaped like `tree`.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [x.astype(jnp.float32) + std * jax.random.normal(k, x.shape, jnp.float32)
           for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)
