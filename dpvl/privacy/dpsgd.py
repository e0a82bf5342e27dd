"""The private gradient of one logical step: clip, sum over micro-batches, noise once, normalise.

  g = (sum_i clip_C(grad loss_i) + N(0, (sigma C)^2 I)) / B_expected

The sum runs over every real example of the step's Poisson batch (all micro-batches); the noise
is drawn once, with the step's own key; the divisor is the *expected* batch size q N, a public
constant, never the realised one (which would leak the batch size). The non-private mode runs
the same step without clipping and noise, normalised by the same constant.

The DP loss estimate (optional, `config.privacy.loss_estimate`) is a second release of the same
step: with each unit's loss clipped to [0, B] (a unit is what the mechanism clips: an example,
or a per-batch hash group),

  dp_loss = (sum_i clip(loss_i, 0, B) + N(0, (sigma_l B)^2)) / B_expected,

over the kept units, its noise drawn with a key of its own (`secrets.RunSecrets.loss_noise_key`,
independent of the gradient's, which it leaves as it is). The plan accounts both releases as one
Gaussian mechanism (`dpvl.privacy.accounting.combined_noise_multiplier`).
"""

import jax
import jax.numpy as jnp

from dpvl.privacy import clipping
from dpvl.privacy import noise


def private_gradient(loss_fn, params, batch, mask, rngs, noise_key, *, clip_norm: float,
                     noise_std: float, expected_batch_size: int, enabled: bool = True,
                     shardings=None, clipping_strategy: str = "vmap",
                     loss_bound: float | None = None, loss_noise_std: float = 0.0,
                     loss_noise_key=None):
  """Returns (gradient estimate, stats) for one logical step.

  Args:
    loss_fn: (params, example, rng) -> scalar loss of one example.
    batch, mask, rngs: leading axes [num_microbatches, microbatch_size].
    noise_key: this step's own noise key (`secrets.RunSecrets.noise_key`).
    clip_norm, noise_std: C and sigma * C from the privacy plan.
    expected_batch_size: q * N, the divisor.
    enabled: False for the non-private baseline (no clipping, no noise).
    shardings: the parameters' shardings (`noisy_mean`), or None.
    clipping_strategy: how the clipped sum is computed, a key of `clipping.STRATEGIES`: "vmap"
      (the reference) or "ghost" (book-keeping); the same sum either way.
    loss_bound: None (no loss estimate), or B: each example's loss is clipped to [0, B].
    loss_noise_std: sigma_l * B, the loss estimate's noise std.
    loss_noise_key: this step's loss noise key (`secrets.RunSecrets.loss_noise_key`).

  Returns:
    (gradient estimate, metrics), as `noisy_mean` gives them.
  """
  if (loss_bound is None) != (loss_noise_key is None):
    raise ValueError("the DP loss estimate needs both a loss bound and a loss noise key.")
  if enabled:
    total, stats = clipping.STRATEGIES[clipping_strategy](loss_fn, params, batch, mask, rngs,
                                                          clip_norm, loss_bound)
    valid = jnp.maximum(jnp.sum(mask), 1)
    stats["clipped_fraction"] = jnp.sum((stats["norms"] > clip_norm) & mask) / valid
    stats["grad_norm_mean"] = jnp.sum(stats["norms"]) / valid
  else:
    total, stats = clipping.grad_sum(loss_fn, params, batch, mask, rngs)
  return noisy_mean(total, stats, mask, noise_key, noise_std=noise_std,
                    expected_batch_size=expected_batch_size, enabled=enabled,
                    shardings=shardings, loss_noise_std=loss_noise_std,
                    loss_noise_key=loss_noise_key)


def noisy_mean(total, stats, mask, noise_key, *, noise_std: float, expected_batch_size: int,
               enabled: bool, shardings=None, loss_noise_std: float = 0.0,
               loss_noise_key=None):
  """(total + N(0, noise_std^2 I) when `enabled`) / expected batch size, and the step's metrics.

  The one place where a private step adds its noise and divides: every mechanism (per-example
  here, the contrastive ones in `contrastive`) ends with it. `stats`: `loss_sum`, `nonfinite`,
  when enabled `clipped_fraction` and `grad_norm_mean`, and with the loss estimate
  `clipped_loss_sum`.

  Args:
    total: the (clipped) gradient sum, a float32 pytree shaped like the parameters.
    stats: the mechanism's statistics, as above.
    mask: bool [num_microbatches, microbatch_size]; False for padding.
    noise_key: this step's noise key (`secrets.RunSecrets.noise_key`).
    noise_std: sigma * C, the noise's standard deviation.
    expected_batch_size: q * N, the divisor (a public constant).
    enabled: False for the non-private baseline (no noise).
    shardings: None, or the parameters' shardings: the noise is drawn, and the estimate laid
      out, shard by shard (`noise.add_gaussian_noise`).
    loss_noise_std: sigma_l * B, the loss estimate's noise std.
    loss_noise_key: None (no loss estimate), or this step's loss noise key
      (`secrets.RunSecrets.loss_noise_key`): `stats` then holds `clipped_loss_sum`.

  Returns:
    (gradient estimate shaped like `total`, metrics): `loss` (mean over valid, finite
    examples), `examples` (valid), `nonfinite`, when enabled `clipped_fraction` and
    `grad_norm_mean`, and with a loss noise key `dp_loss`: (`clipped_loss_sum` +
    N(0, loss_noise_std^2)) / expected batch size, the only one of them that is private.
  """
  if shardings is not None:
    total = jax.lax.with_sharding_constraint(total, shardings)
  if enabled:
    total = noise.add_gaussian_noise(total, noise_key, noise_std, shardings)
  grad = jax.tree.map(lambda g: g / expected_batch_size, total)
  examples = jnp.sum(mask)
  metrics = dict(
      loss=stats["loss_sum"] / jnp.maximum(examples - stats["nonfinite"], 1),
      examples=examples,
      nonfinite=stats["nonfinite"],
  )
  if enabled:
    metrics["clipped_fraction"] = stats["clipped_fraction"]
    metrics["grad_norm_mean"] = stats["grad_norm_mean"]
  if loss_noise_key is not None:
    if not enabled or "clipped_loss_sum" not in stats:
      raise ValueError("the DP loss estimate needs a private step and a loss bound.")
    noisy_loss = noise.add_gaussian_noise(stats["clipped_loss_sum"], loss_noise_key,
                                          loss_noise_std)
    metrics["dp_loss"] = noisy_loss / expected_batch_size
  return grad, metrics
