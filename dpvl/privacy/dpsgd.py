"""The private gradient of one logical step: clip, sum over micro-batches, noise once, normalise.

  g = (sum_i clip_C(grad loss_i) + N(0, (sigma C)^2 I)) / B_expected

The sum runs over every real example of the step's Poisson batch (all micro-batches); the noise
is drawn once, with the step's own key; the divisor is the *expected* batch size q N, a public
constant, never the realised one (which would leak the batch size). The non-private mode runs
the same step without clipping and noise, normalised by the same constant.
"""

import jax
import jax.numpy as jnp

from dpvl.privacy import clipping
from dpvl.privacy import noise


def private_gradient(loss_fn, params, batch, mask, rngs, noise_key, *, clip_norm: float,
                     noise_std: float, expected_batch_size: int, enabled: bool = True,
                     shardings=None, clipping_strategy: str = "vmap"):
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

  Returns:
    (gradient estimate, metrics), as `noisy_mean` gives them.
  """
  if enabled:
    total, stats = clipping.STRATEGIES[clipping_strategy](loss_fn, params, batch, mask, rngs,
                                                          clip_norm)
    valid = jnp.maximum(jnp.sum(mask), 1)
    stats["clipped_fraction"] = jnp.sum((stats["norms"] > clip_norm) & mask) / valid
    stats["grad_norm_mean"] = jnp.sum(stats["norms"]) / valid
  else:
    total, stats = clipping.grad_sum(loss_fn, params, batch, mask, rngs)
  return noisy_mean(total, stats, mask, noise_key, noise_std=noise_std,
                    expected_batch_size=expected_batch_size, enabled=enabled,
                    shardings=shardings)


def noisy_mean(total, stats, mask, noise_key, *, noise_std: float, expected_batch_size: int,
               enabled: bool, shardings=None):
  """(total + N(0, noise_std^2 I) when `enabled`) / expected batch size, and the step's metrics.

  The one place where a private step adds its noise and divides: every mechanism (per-example
  here, the contrastive ones in `contrastive`) ends with it. `stats`: `loss_sum`, `nonfinite`,
  and when enabled `clipped_fraction` and `grad_norm_mean`.

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

  Returns:
    (gradient estimate shaped like `total`, metrics): `loss` (mean over valid, finite
    examples), `examples` (valid), `nonfinite`, and when enabled `clipped_fraction` and
    `grad_norm_mean`.
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
  return grad, metrics
