"""Per-example clipped gradient sums, accumulated over micro-batches.

`clipped_grad_sum` is the reference strategy: per-example gradients by `jax.vmap(jax.grad)`,
each scaled to L2 norm at most C, summed in float32 over a `lax.scan` of micro-batches. A padded
example (mask False) and an example whose gradient is not finite contribute exactly zero:
its gradient is replaced by zeros with `jnp.where`, never multiplied by zero (0 * nan = nan).

`ghost_clipped_grad_sum` gives the same from one backward pass per micro-batch, by book-keeping
ghost clipping (`dpvl.privacy.ghost`); `STRATEGIES` names both (`config.privacy.clipping`).

`grad_sum` is the non-private counterpart (no per-example gradients, no clipping) with the same
inputs and outputs, for baselines.

With a `loss_bound` B, the private strategies also return `clipped_loss_sum`: the sum over the
kept examples (valid, finite gradient and loss) of their loss clipped to [0, B], the sum the DP
loss estimate releases with noise (`dpvl.privacy.dpsgd.noisy_mean`).

A loss function here is `loss_fn(params, example, rng) -> scalar` on one example (no batch axis).
Batches are pytrees with leading axes [num_microbatches, microbatch_size, ...]; `mask` and `rngs`
have the same two leading axes.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpvl.parallel import mesh as mesh_lib
from dpvl.privacy import ghost

LossFn = Callable[[Any, Any, jax.Array], jax.Array]


def global_norms(tree) -> jax.Array:
  """L2 norm over all leaves, per example (leaves have a leading example axis)."""
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
             for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def clip(per_example_grads, mask: jax.Array, clip_norm: float):
  """g_i * min(1, C / ||g_i||) for valid, finite examples; exactly zero for the others.

  Args:
    per_example_grads: a pytree of per-example gradients, leaves [B, ...].
    mask: bool [B]; False for padding.
    clip_norm: C, the largest L2 norm (over all leaves) an example's gradient keeps.

  Returns:
    (clipped per-example grads in float32, same shapes, stats): `norms` float32 [B] before
    clipping (0 on padding; inf or nan on valid non-finite ones), `kept` bool [B] (valid and
    finite), `nonfinite` int scalar (valid examples dropped because their gradient is not
    finite).
  """
  scale, keep, stats = clip_factors(global_norms(per_example_grads), mask, clip_norm)

  def clip_leaf(g):
    g = g.astype(jnp.float32)
    expand = (slice(None),) + (None,) * (g.ndim - 1)
    return jnp.where(keep[expand], g * scale[expand], 0.0)

  return jax.tree.map(clip_leaf, per_example_grads), stats


def clip_factors(norms: jax.Array, mask: jax.Array, clip_norm: float):
  """Each example's clip factor min(1, C / norm), which examples are kept, and their stats.

  Args:
    norms: float32 [B], the examples' gradient norms (inf or nan when not finite).
    mask: bool [B]; False for padding.
    clip_norm: C.

  Returns:
    (factors float32 [B], keep bool [B]: valid and finite, stats as `clip` gives them);
    a factor is meaningful where `keep` only: the others must contribute zero by `jnp.where`.
  """
  finite = jnp.isfinite(norms)
  keep = mask & finite
  factors = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
  stats = dict(norms=jnp.where(mask, norms, 0.0), kept=keep, nonfinite=jnp.sum(mask & ~finite))
  return factors, keep, stats


def clipped_losses(losses: jax.Array, ok: jax.Array, loss_bound: float) -> jax.Array:
  """The losses clipped to [0, `loss_bound`] in float32 where `ok`, exactly zero elsewhere (a
  NaN loss never reaches the sum)."""
  return jnp.where(ok, jnp.clip(losses.astype(jnp.float32), 0.0, loss_bound), 0.0)


def _with_loss_sum(stats: dict, losses: jax.Array, loss_bound: float | None = None) -> dict:
  """`clip_factors`' stats with `kept` replaced by `loss_sum`: the sum of the kept, finite
  losses; and with a `loss_bound`, `clipped_loss_sum`: the sum of those losses clipped to
  [0, loss_bound]."""
  ok = stats.pop("kept") & jnp.isfinite(losses)
  stats = dict(stats, loss_sum=jnp.sum(jnp.where(ok, losses, 0.0)))
  if loss_bound is not None:
    stats["clipped_loss_sum"] = jnp.sum(clipped_losses(losses, ok, loss_bound))
  return stats


def zeros_f32(params):
  """float32 zeros shaped like `params`: the accumulator of gradient sums."""
  return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def scan_microbatches(micro_fn, params, batch, mask, rngs, clipped_loss: bool = False):
  """Sums `micro_fn(params, micro, mask, rngs) -> (grad_sum, stats)` over the leading axis.

  `stats` has `loss_sum` and `nonfinite` (summed), `norms` (stacked per micro-batch) and, when
  `clipped_loss`, `clipped_loss_sum` (summed).

  Args:
    micro_fn: (params, micro-batch, mask [microbatch_size], rngs [microbatch_size]) ->
      (gradient sum shaped like `params`, {loss_sum, nonfinite, norms [microbatch_size]}).
    params: the parameters, passed to every call.
    batch: a pytree, leaves [num_microbatches, microbatch_size, ...].
    mask: bool [num_microbatches, microbatch_size]; False for padding.
    rngs: per-example PRNG keys, leading axes [num_microbatches, microbatch_size].
    clipped_loss: also sum the micro-batches' `clipped_loss_sum`.

  Returns:
    (gradient sum, float32, shaped like `params`; {`loss_sum`: float32 scalar, `nonfinite`:
    int32 scalar, `norms`: float32 [num_microbatches, microbatch_size], and when
    `clipped_loss`, `clipped_loss_sum`: float32 scalar}).
  """
  summed = ("loss_sum", "nonfinite") + (("clipped_loss_sum",) if clipped_loss else ())

  def body(acc, xs):
    micro, m, r = xs
    g, stats = micro_fn(params, micro, m, r)
    acc_g, *sums = acc
    acc_g = jax.tree.map(jnp.add, acc_g, g)
    return (acc_g, *(s + stats[k] for s, k in zip(sums, summed))), stats["norms"]

  init = (zeros_f32(params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
          *(jnp.zeros((), jnp.float32) for _ in summed[2:]))
  (g, *sums), norms = jax.lax.scan(body, init, (batch, mask, rngs))
  return g, dict(zip(summed, sums), norms=norms)


def clipped_grad_sum(loss_fn: LossFn, params, batch, mask, rngs, clip_norm: float,
                     loss_bound: float | None = None):
  """Sum of per-example gradients clipped to `clip_norm`, over all micro-batches.

  Args:
    loss_fn: (params, example, rng) -> scalar loss of one example (no batch axis).
    params: the parameters.
    batch: a pytree, leaves [num_microbatches, microbatch_size, ...].
    mask: bool [num_microbatches, microbatch_size]; False for padding.
    rngs: per-example PRNG keys, leading axes [num_microbatches, microbatch_size].
    clip_norm: C, the L2 norm each example's gradient is clipped to.
    loss_bound: None, or the bound B of the losses summed into `clipped_loss_sum`.

  Returns:
    (grad_sum in float32, shaped like `params`, stats) with stats: `loss_sum` (sum of valid,
    finite losses), `nonfinite` (valid examples dropped), `norms` ([num_micro, micro] unclipped
    norms, 0 on padding) and, with a `loss_bound`, `clipped_loss_sum` (the kept examples'
    losses clipped to [0, B], summed).
  """
  value_and_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0),
                            spmd_axis_name=mesh_lib.BATCH_AXES)  # examples: split over them

  def micro_fn(params, micro, m, r):
    losses, grads = value_and_grad(params, micro, r)
    clipped, stats = clip(grads, m, clip_norm)
    return (jax.tree.map(lambda x: jnp.sum(x, axis=0), clipped),
            _with_loss_sum(stats, losses, loss_bound))

  return scan_microbatches(micro_fn, params, batch, mask, rngs, loss_bound is not None)


def ghost_clipped_grad_sum(loss_fn: LossFn, params, batch, mask, rngs, clip_norm: float,
                           loss_bound: float | None = None):
  """`clipped_grad_sum` by book-keeping ghost clipping: the same inputs and outputs (to float
  rounding), from one forward and one backward pass per micro-batch (`dpvl.privacy.ghost`)."""
  plan = ghost.discover(loss_fn, params, *ghost.one_unit((batch, rngs)))

  def micro_fn(params, micro, m, r):
    losses, parts = ghost.backward(plan, loss_fn, params, micro, r)
    norms = jnp.sqrt(ghost.squared_norms(plan, parts))
    factors, keep, stats = clip_factors(norms, m, clip_norm)
    return (ghost.clipped_sum(plan, params, parts, keep, factors),
            _with_loss_sum(stats, losses, loss_bound))

  return scan_microbatches(micro_fn, params, batch, mask, rngs, loss_bound is not None)


STRATEGIES = {"vmap": clipped_grad_sum, "ghost": ghost_clipped_grad_sum}


def grad_sum(loss_fn: LossFn, params, batch, mask, rngs):
  """Non-private: the gradient of the summed loss over valid examples (no clipping).

  Args:
    loss_fn: (params, example, rng) -> scalar loss of one example (no batch axis).
    params: the parameters.
    batch: a pytree, leaves [num_microbatches, microbatch_size, ...].
    mask: bool [num_microbatches, microbatch_size]; False for padding.
    rngs: per-example PRNG keys, leading axes [num_microbatches, microbatch_size].

  Returns:
    (grad_sum in float32, shaped like `params`, stats) as `clipped_grad_sum`'s, but
    `loss_sum` sums every valid loss, finite or not, and `norms` is all zeros.
  """
  losses_fn = jax.vmap(loss_fn, in_axes=(None, 0, 0), spmd_axis_name=mesh_lib.BATCH_AXES)

  def micro_fn(params, micro, m, r):
    def total(p):
      losses = losses_fn(p, micro, r)
      return jnp.sum(jnp.where(m, losses, 0.0)), losses

    (_, losses), g = jax.value_and_grad(total, has_aux=True)(params)
    g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
    stats = dict(loss_sum=jnp.sum(jnp.where(m, losses, 0.0)),
                 nonfinite=jnp.sum(m & ~jnp.isfinite(losses)),
                 norms=jnp.zeros(m.shape, jnp.float32))
    return g, stats

  return scan_microbatches(micro_fn, params, batch, mask, rngs)
