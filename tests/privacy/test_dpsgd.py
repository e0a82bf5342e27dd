"""The private gradient (DP-SGD): noise drawn once per step, the expected batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.privacy import clipping
from dpvl.privacy import dpsgd
from tests.privacy import mlp


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
  params, batch, rngs = mlp.make()
  mask = np.ones((3, 4), bool)
  mask[0, :2] = False  # realised 10
  kwargs = dict(clip_norm=1.0, noise_std=0.0)
  g, metrics = dpsgd.private_gradient(mlp.loss, params, batch, jnp.asarray(mask), rngs,
                                      jax.random.key(0), expected_batch_size=40, **kwargs)
  total, _ = clipping.clipped_grad_sum(mlp.loss, params, batch, jnp.asarray(mask), rngs, 1.0)
  np.testing.assert_allclose(mlp.flat(g), mlp.flat(total) / 40, rtol=1e-6)
  assert int(metrics["examples"]) == 10
