"""The private gradient (DP-SGD): noise drawn once per step, the expected batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.privacy import clipping
from dpvl.privacy import dpsgd
from dpvl.privacy import noise
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



# -- the DP loss estimate --------------------------------------------------------------------


def _planted_loss(params, example, rng):
  """The example's planted loss `x`; its gradient is zero, or NaN where `x` is."""
  del rng
  return example["x"] * (1.0 + 0.0 * jnp.sum(params["w"]))


def _planted(losses, mask):
  """The arguments of `private_gradient` for planted losses [num_micro, micro]."""
  rngs = jax.random.split(jax.random.key(0), losses.size).reshape(losses.shape)
  return dict(w=jnp.zeros(3)), dict(x=jnp.asarray(losses)), jnp.asarray(mask), rngs


@pytest.mark.parametrize("strategy", ["vmap", "ghost"])
def test_dp_loss_clips_each_loss_to_zero_and_the_bound(strategy):
  losses = np.array([[25.0, -3.0, 4.0, np.nan], [7.0, 100.0, 1.0, 2.0]], np.float32)
  mask = np.array([[True, True, True, True], [True, False, True, True]])  # 100: padding
  _, metrics = dpsgd.private_gradient(
      _planted_loss, *_planted(losses, mask), jax.random.key(1), clip_norm=1.0, noise_std=0.0,
      expected_batch_size=20, clipping_strategy=strategy, loss_bound=10.0, loss_noise_std=0.0,
      loss_noise_key=jax.random.key(2))
  # 25 -> 10 and -3 -> 0; the NaN example is dropped, the padding ignored.
  assert float(metrics["dp_loss"]) == pytest.approx((10 + 0 + 4 + 7 + 1 + 2) / 20)
  assert int(metrics["nonfinite"]) == 1
  assert float(metrics["loss"]) == pytest.approx((25 - 3 + 4 + 7 + 1 + 2) / 6)  # unclipped


def test_dp_loss_noise_std_is_sigma_l_times_the_bound_over_the_batch():
  losses = np.full((2, 3), 4.0, np.float32)
  args = _planted(losses, np.ones(losses.shape, bool))
  bound, sigma_l, b, n = 10.0, 3.0, 50, 20_000

  @jax.jit
  @jax.vmap
  def dp_loss(key):
    return dpsgd.private_gradient(
        _planted_loss, *args, jax.random.key(1), clip_norm=1.0, noise_std=1.0,
        expected_batch_size=b, loss_bound=bound, loss_noise_std=sigma_l * bound,
        loss_noise_key=key)[1]["dp_loss"]

  draws = np.asarray(dp_loss(jax.random.split(jax.random.key(3), n)), np.float64)
  std = sigma_l * bound / b
  assert abs(draws.std() - std) < 6 * std / np.sqrt(2 * n), (draws.std(), std)
  assert abs(draws.mean() - 24.0 / b) < 6 * std / np.sqrt(n)


def test_the_loss_estimate_leaves_the_gradient_bit_identical():
  params, batch, rngs = mlp.make()
  mask = np.ones((3, 4), bool)
  mask[2, 1:] = False
  mask = jnp.asarray(mask)
  key = jax.random.key(7)
  kwargs = dict(clip_norm=0.5, noise_std=0.8, expected_batch_size=16)
  step = lambda **extra: dpsgd.private_gradient(mlp.loss, params, batch, mask, rngs, key,
                                                **kwargs, **extra)
  off_grad, off_metrics = step()
  # The step as it is without the estimate's code: clip, sum, noise once with `key`, divide.
  total, _ = clipping.clipped_grad_sum(mlp.loss, params, batch, mask, rngs, 0.5)
  before = jax.tree.map(lambda g: g / 16, noise.add_gaussian_noise(total, key, 0.8))
  jax.tree.map(np.testing.assert_array_equal, off_grad, before)
  assert "dp_loss" not in off_metrics
  on_grad, on_metrics = step(loss_bound=1.0, loss_noise_std=5.0,
                             loss_noise_key=jax.random.key(8))
  jax.tree.map(np.testing.assert_array_equal, on_grad, off_grad)
  assert set(on_metrics) - set(off_metrics) == {"dp_loss"}
  for name, value in off_metrics.items():
    np.testing.assert_array_equal(on_metrics[name], value, err_msg=name)
