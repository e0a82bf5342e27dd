"""DP mechanisms for the batch-coupled contrastive loss of a dual encoder (DP-CLIP).

The loss. For image embeddings u_i and text embeddings v_j (L2-normalised, so the cosine
similarity s_ij = <u_i, v_j> lies in [-1, 1]) and a fixed temperature tau, the symmetric InfoNCE
loss of pair i in a batch is
  l_i = 1/2 [ -s_ii/tau + logsumexp_j s_ij/tau ] + 1/2 [ -s_ii/tau + logsumexp_j s_ji/tau ],
over the valid (unmasked) pairs of the batch. Pair i's loss depends on every other pair's
embeddings, so clipping each pair's gradient of l_i bounds nothing: adding one pair moves every
other l_i (it is a new negative for all of them), and the summed clipped gradients move by up
to ~n C (`tests/privacy/test_contrastive.py` measures it). Two mechanisms bound the move
instead. Both declare the L2 sensitivity Delta of the summed gradient under adding or removing
one pair (the neighbouring relation of the accountant); the noise is N(0, (sigma Delta)^2 I), so
the accountant's noise multiplier sigma means what it means for DP-SGD. Replacing a pair is a
removal plus an addition: 2 Delta.

`per_batch` (Huang et al., DP-CLIP): the step's pairs are split into groups; each group's
summed contrastive loss couples only the pairs of that group, its gradient is clipped to C as a
unit, and the clipped group gradients are summed. A pair's group is a keyed hash of its record
index and the step (`hash_groups`), not its position in the batch, so adding or removing a pair
changes exactly one group. That group's clipped gradient goes from a to a' with ||a||, ||a'|| <=
C, so Delta = 2C (C when the pair was alone in its group; 2C in general).

`logit_dp` (Kong, Munoz Medina, Ribero, arXiv 2310.03104): the gradient of the summed loss
L = sum_i l_i decomposes through the similarities, grad L = sum_ij a_ij grad s_ij with
a_ij = dL/ds_ij. Each pairwise similarity gradient g_ij = grad_w s_ij is clipped to norm B and
recombined with the same coefficients: g = sum_ij a_ij clip_B(g_ij). Sensitivity: add pair k to
a batch of n pairs (P, Q the row and column softmaxes of s/tau, primes after the addition).
Terms (i, j) with i, j != k keep their clip_B(g_ij) (it depends on x_i, y_j and the parameters
only) and change coefficient; terms in row or column k are new. With
a_ij = (1/(2 tau)) [(P_ij - [i=j]) + (Q_ij - [i=j])]:
  row k:       sum_j |a'_kj|            <= 1/(2 tau) [2(1 - P'_kk) + (1 - Q'_kk) + sum_{j!=k} Q'_kj]
  column k:    sum_{i!=k} |a'_ik|       <= 1/(2 tau) [sum_{i!=k} P'_ik + (1 - Q'_kk)]
  other terms: sum_{i,j!=k} |a'_ij-a_ij|<= 1/(2 tau) [sum_{i!=k} P'_ik + sum_{j!=k} Q'_kj]
(adding column k to row i rescales row i's other entries by a common factor, which moves them by
P'_ik in L1 in total; likewise for columns). So ||g' - g|| <= B sum |coefficient changes|
<= (B/tau) [2 + sum_{i!=k} P'_ik + sum_{j!=k} Q'_kj]. Each P'_ik <= 1/(1 + n e^(-2/tau)),
since similarities lie in [-1, 1], and n + 1 <= M, the padded batch capacity. Hence
  Delta = (B / tau) (2 + 2 R),   R = (M - 1) / (1 + (M - 1) e^(-2/tau)) <= min(M - 1, e^(2/tau)),
O(1) in the batch size: the paper's (G1 + G2 + n L) B, for this loss. The temperature is fixed
(not learnt): Delta depends on it. A small tau makes e^(2/tau) large, and then Delta grows like M.

Computing every clip_B(g_ij) without n^2 backward passes (the towers share no parameter):
g_ij = J_i^T v_j + K_j^T u_i, with J_i, K_j the Jacobians of u_i and v_j, so
  ||g_ij||^2 = v_j^T (J_i J_i^T) v_j + u_i^T (K_j K_j^T) u_i
from per-example d x d Gram matrices (d backward passes per example, `pair_norms="exact"`), or
bounded by lambda_max(J_i J_i^T) + lambda_max(K_j K_j^T) (`pair_norms="bound"`, O(n) memory;
clipping by a bound of the norm is still a clip to B). And with w_ij = a_ij min(1, B/||g_ij||),
  g = sum_i J_i^T (sum_j w_ij v_j) + sum_j K_j^T (sum_i w_ij u_i):
one backward pass per tower with cotangents W v and W^T u. The step is two passes over the
micro-batches: embeddings (and Grams) first, then the weighted backward pass.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpvl.privacy import clipping
from dpvl.privacy import dpsgd
from dpvl.privacy import ghost
from dpvl.privacy.sampling import Selection

PAIR_NORMS = ("exact", "bound")


@dataclasses.dataclass(frozen=True)
class DualEncoder:
  """What the contrastive mechanisms need from a model.

  Parameters are a dict {"image": ..., "text": ...}: the two towers share none.
  embed_image: (image params, example) -> L2-normalised embedding [d] of one example's image.
  embed_text: (text params, example) -> L2-normalised embedding [d] of its caption.
  temperature: the fixed softmax temperature tau.
  Both towers must be finite, with finite derivatives, on the all-zeros example: the public
  placeholder that the mechanisms embed in place of padding and of dropped examples.
  """

  embed_image: Callable[[Any, Any], jax.Array]
  embed_text: Callable[[Any, Any], jax.Array]
  temperature: float

  def embed(self, params, examples):
    """(u [n, d], v [n, d]) for a batch of examples (mapped with `ghost.vmap`, so that ghost
    clipping sees every layer call of a group)."""
    u = ghost.vmap(self.embed_image, (None, 0))(params["image"], examples)
    v = ghost.vmap(self.embed_text, (None, 0))(params["text"], examples)
    return u, v


def contrastive_losses(sims, mask, temperature: float):
  """Per-pair symmetric InfoNCE losses [n] from similarities [n, n]; 0 on masked pairs.

  Args:
    sims: [n, n] similarities s_ij = <u_i, v_j>, image rows and caption columns.
    mask: bool [n]; False for padding (its row and column take no part).
    temperature: tau.

  Returns:
    float32 [n]: l_i of the module docstring over the valid pairs; 0 where `mask` is False.
  """
  logits = sims.astype(jnp.float32) / temperature
  pair = mask[:, None] & mask[None, :]
  logits = jnp.where(pair, logits, -1e9)  # finite: a fully masked row has finite gradients
  diag = jnp.where(mask, jnp.diagonal(logits), 0.0)
  rows = jax.nn.logsumexp(logits, axis=1)
  cols = jax.nn.logsumexp(logits, axis=0)
  losses = 0.5 * (rows - diag) + 0.5 * (cols - diag)
  return jnp.where(mask, losses, 0.0)


def _placeholder(keep, examples):
  """`examples` with every leaf of each example where `keep` is False set to zeros.

  `keep` has the examples' leading shape. The zeros are a fixed public placeholder (the loader
  pads with them too): a dropped example's cotangent is zero, but 0 x NaN is NaN, so a NaN or
  inf input that reached a backward pass would spread over the shared parameters' gradient
  and reveal the record.
  """

  def leaf(x):
    k = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
    return jnp.where(k, x, jnp.zeros((), x.dtype))

  return jax.tree.map(leaf, examples)


def per_batch_sensitivity(clip_norm: float) -> float:
  """Delta of `per_batch` under add/remove: 2C (see the module docstring)."""
  return 2.0 * clip_norm


def logit_dp_sensitivity(clip_norm: float, temperature: float, max_batch: int) -> float:
  """Delta of `logit_dp` under add/remove for batches of at most `max_batch` pairs.

  Args:
    clip_norm: B, the norm each pairwise similarity gradient is clipped to.
    temperature: tau, the fixed softmax temperature.
    max_batch: M, the most valid pairs a batch can hold (the padded capacity).

  Returns:
    (B / tau) (2 + 2 R), R = (M - 1) / (1 + (M - 1) e^(-2/tau)) (see the module docstring).
  """
  others = max(max_batch - 1, 0)
  r = others / (1.0 + others * math.exp(-2.0 / temperature))
  return clip_norm / temperature * (2.0 + 2.0 * r)


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective 64-bit mix (uint64 in, uint64 out)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def group_of(indices: np.ndarray, key: int, step: int, groups: int) -> np.ndarray:
  """The group in [0, groups) of each record index at `step`: a keyed hash of (index, step).

  A function of the record's own index only, so adding or removing a record moves no other
  record between groups. Fresh groups every step; the key is the run's secret group salt
  (`secrets.RunSecrets.group_salt`).

  Args:
    indices: int record indices, any shape.
    key: the secret 64-bit group salt.
    step: the global step.
    groups: the number of groups.

  Returns:
    int64, shaped like `indices`: each record's group.
  """
  with np.errstate(over="ignore"):
    salt = _mix64(np.array([(int(key) ^ (int(step) * 0x9E3779B97F4A7C15)) & (2**64 - 1)],
                           np.uint64))
    h = _mix64(np.asarray(indices, np.uint64) ^ salt)
  return (h % np.uint64(groups)).astype(np.int64)


def hash_groups(selection: Selection, key: int, step: int, groups: int,
                group_capacity: int) -> Selection:
  """Lays a step's selected records out as `groups` blocks of `group_capacity` slots.

  Record r goes to block `group_of(r)`; a block holds its records in index order, then padding.
  Records beyond a full block are dropped and counted in `truncated` (the plan sizes the blocks
  so that this is negligible and pays for it in delta, like the sampler's own truncation).

  Args:
    selection: the step's Poisson selection (`PoissonSampler.select`).
    key: the secret 64-bit group salt (see `group_of`).
    step: the global step.
    groups: the number of blocks.
    group_capacity: the slots of each block (the micro-batch size).

  Returns:
    A `Selection` of groups * group_capacity slots, block g in slots
    [g * group_capacity, (g + 1) * group_capacity); `poisson_size` kept, `truncated` adding
    the records dropped here.
  """
  idx = selection.indices[selection.mask]
  g = group_of(idx, key, step, groups)
  order = np.lexsort((idx, g))
  idx, g = idx[order], g[order]
  starts = np.searchsorted(g, np.arange(groups))
  rank = np.arange(idx.size) - starts[g]
  keep = rank < group_capacity
  slots = g[keep] * group_capacity + rank[keep]
  indices = np.zeros(groups * group_capacity, np.int64)
  mask = np.zeros(groups * group_capacity, bool)
  indices[slots], mask[slots] = idx[keep], True
  return Selection(indices, mask, poisson_size=selection.poisson_size,
                   truncated=selection.truncated + int((~keep).sum()))


def _group_losses(model: DualEncoder, params, group, mask):
  """(sum of the group's pair losses, the losses [capacity]) for a group already placeheld."""
  u, v = model.embed(params, group)
  losses = contrastive_losses(u @ v.T, mask, model.temperature)
  return jnp.sum(losses), losses


def group_unit_loss(model: DualEncoder, params, unit, rng=None):
  """The summed loss of one group as ghost clipping's unit: unit = (examples, mask)."""
  del rng
  group, mask = unit
  return _group_losses(model, params, _placeholder(mask, group), mask)[0]


def _group_stats(ok, loss_sum, norm, mask, loss_bound: float | None = None) -> dict:
  """A group's stats for `clipping.scan_microbatches`: its loss and norm if kept (`ok`), else
  zeros and every record of the group counted in `nonfinite`; with a `loss_bound`, also its
  loss clipped to [0, loss_bound] (`clipped_loss_sum`, zero if not kept)."""
  stats = dict(loss_sum=jnp.where(ok, loss_sum, 0.0), nonfinite=jnp.where(ok, 0, jnp.sum(mask)),
               norms=jnp.where(ok, norm, 0.0))
  if loss_bound is not None:
    stats["clipped_loss_sum"] = clipping.clipped_losses(loss_sum, ok, loss_bound)
  return stats


def per_batch_gradient(model: DualEncoder, params, batch, mask, rngs, noise_key, *,
                       clip_norm: float, noise_std: float, expected_batch_size: int,
                       enabled: bool = True, shardings=None, clipping_strategy: str = "vmap",
                       loss_bound: float | None = None, loss_noise_std: float = 0.0,
                       loss_noise_key=None, **_):
  """Per-batch clipping: micro-batch g of `batch` [groups, capacity, ...] is group g.

  Padding is embedded as the zero placeholder. A group whose loss or gradient is not finite (a
  NaN or inf input, or a tower that cannot embed one of its records) is dropped whole, with
  `jnp.where`, and its records counted in `nonfinite`: adding the record moves only its group,
  from a clipped gradient to zero. Returns (gradient estimate, metrics) like
  `dpsgd.private_gradient`.

  Args:
    model: the dual encoder.
    params: {"image": ..., "text": ...}.
    batch: a pytree, leaves [groups, capacity, ...]: micro-batch g is group g (`hash_groups`).
    mask: bool [groups, capacity]; False for padding.
    rngs: per-example PRNG keys, leading axes [groups, capacity]; unused (deterministic).
    noise_key: this step's noise key (`secrets.RunSecrets.noise_key`).
    clip_norm: C, the norm each group's gradient is clipped to.
    noise_std: sigma * Delta = sigma * 2C, the noise's standard deviation.
    expected_batch_size: q * N, the divisor.
    enabled: False for the non-private baseline (no clipping, no noise).
    shardings: the parameters' shardings (`dpsgd.noisy_mean`), or None.
    clipping_strategy: "vmap" (the group's gradient, then its norm) or "ghost" (book-keeping
      with the group as the unit: its norm and clipped gradient from the layers' inputs and
      output gradients); the same clipped sum either way.
    loss_bound: None (no loss estimate), or B: each group's summed loss is clipped to [0, B]
      (the group is the unit: adding or removing a record moves one group's clipped loss, by at
      most B).
    loss_noise_std: sigma_l * B, the loss estimate's noise std.
    loss_noise_key: this step's loss noise key (`secrets.RunSecrets.loss_noise_key`).

  Returns:
    (gradient estimate shaped like `params`, metrics of `dpsgd.noisy_mean`); there,
    `clipped_fraction` and `grad_norm_mean` are over the non-empty groups.
  """

  group_loss = functools.partial(_group_losses, model)

  def clipped_group(p, group, m, _):
    """The group's gradient clipped to C as one unit (zero if it or the loss is not finite)."""
    group = _placeholder(m, group)
    (_, losses), g = jax.value_and_grad(group_loss, has_aux=True)(p, group, m)
    as_one = jax.tree.map(lambda x: x[None], g)
    clipped, stats = clipping.clip(as_one, jnp.all(jnp.isfinite(losses))[None],
                                   clip_norm if enabled else jnp.inf)
    return jax.tree.map(lambda x: x[0], clipped), _group_stats(
        stats["kept"][0], jnp.sum(losses), stats["norms"][0], m, loss_bound)

  unit_loss = functools.partial(group_unit_loss, model)

  def ghost_group(p, group, m, _):
    """`clipped_group` by ghost clipping: the group is the one unit of `ghost.backward`; its
    loss is finite exactly when every pair's is (a sum of finite terms, or an overflow:
    dropped too)."""
    unit = jax.tree.map(lambda x: x[None], (group, m))
    loss, parts = ghost.backward(plan, unit_loss, p, unit, None, spmd_axis_name=None)
    norm = jnp.sqrt(ghost.squared_norms(plan, parts))
    factor, keep, _ = clipping.clip_factors(norm, jnp.isfinite(loss), clip_norm)
    return ghost.clipped_sum(plan, p, parts, keep, factor), _group_stats(
        keep[0], loss[0], norm[0], m, loss_bound)

  micro_fn = clipped_group
  if enabled and clipping_strategy == "ghost":
    plan = ghost.discover(unit_loss, params, ghost.one_unit((batch, mask), axes=1), None)
    micro_fn = ghost_group
  if (loss_bound is None) != (loss_noise_key is None):
    raise ValueError("the DP loss estimate needs both a loss bound and a loss noise key.")
  total, stats = clipping.scan_microbatches(micro_fn, params, batch, mask, rngs,
                                            loss_bound is not None)
  nonempty = jnp.any(mask, axis=1)
  groups = jnp.maximum(jnp.sum(nonempty), 1)
  stats["clipped_fraction"] = jnp.sum(nonempty & (stats["norms"] > clip_norm)) / groups
  stats["grad_norm_mean"] = jnp.sum(stats["norms"]) / groups
  return dpsgd.noisy_mean(total, stats, mask, noise_key, noise_std=noise_std,
                          expected_batch_size=expected_batch_size, enabled=enabled,
                          shardings=shardings, loss_noise_std=loss_noise_std,
                          loss_noise_key=loss_noise_key)


def _gram(embed, params, example):
  """(embedding [d], J J^T [d, d]) of one example, J the embedding's Jacobian."""
  jac = jax.jacrev(embed)(params, example)
  leaves = [j.reshape(j.shape[0], -1).astype(jnp.float32) for j in jax.tree.leaves(jac)]
  return embed(params, example), sum(j @ j.T for j in leaves)


def pair_norms(u, v, gram_u, gram_v, how: str = "exact"):
  """||grad s_ij|| [r, c] for image rows u [r, d] and caption columns v [c, d] (exact), or an
  upper bound of it (bound), from per-example Gram matrices [r, d, d] and [c, d, d].

  exact: sqrt(v_j^T G_i v_j + u_i^T H_j u_i); bound: sqrt(lambda_max(G_i) + lambda_max(H_j)).
  For "bound", `gram_u`/`gram_v` may already be the eigenvalue maxima [r] and [c].

  Args:
    u: [r, d] image embeddings.
    v: [c, d] caption embeddings.
    gram_u: [r, d, d] G_i = J_i J_i^T of the image tower ([r] maxima for "bound").
    gram_v: [c, d, d] H_j = K_j K_j^T of the text tower ([c] maxima for "bound").
    how: "exact" or "bound".

  Returns:
    [r, c] the norms (exact) or their upper bounds (bound).

  Raises:
    ValueError: for an unknown `how`.
  """
  if how == "exact":
    outer = lambda x: (x[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)
    a = gram_u.reshape(u.shape[0], -1) @ outer(v).T
    b = outer(u) @ gram_v.reshape(v.shape[0], -1).T
    return jnp.sqrt(jnp.maximum(a + b, 0.0))
  if how == "bound":
    top = lambda g: g if g.ndim == 1 else jnp.linalg.eigvalsh(g)[:, -1]
    return jnp.sqrt(jnp.maximum(top(gram_u)[:, None] + top(gram_v)[None, :], 0.0))
  raise ValueError(f"pair_norms={how!r} is unknown; choose one of {PAIR_NORMS}.")


def pairwise_cotangents(u, v, gram_u, gram_v, valid, *, temperature: float, clip_norm: float,
                        enabled: bool, how: str = "exact"):
  """Logit-DP's pairwise stage over image rows in blocks: O(block x n) memory.

  Inputs have a leading [blocks, block] layout (the micro-batches); invalid rows are zero.
  Returns (cotangents for u and v, same layout as u and v; stats). With
  w_ij = dL/ds_ij min(1, B / ||grad s_ij||) (no clip factor when not `enabled`), the
  cotangents are W v and W^T u, and dL/ds_ij = (1/(2 tau)) [(P_ij - [i=j]) + (Q_ij - [i=j])]
  with P, Q the row and column softmaxes of s / tau over the valid pairs.

  Args:
    u: [blocks, block, d] image embeddings (zero where not valid).
    v: [blocks, block, d] caption embeddings (zero where not valid).
    gram_u: [blocks, block, d, d] image Gram matrices ([blocks, block] maxima for "bound";
      any placeholder when not `enabled`).
    gram_v: as `gram_u`, of the text tower.
    valid: bool [blocks, block]; False for padding and dropped examples.
    temperature: tau.
    clip_norm: B, the norm each pairwise similarity gradient is clipped to.
    enabled: False computes the exact (unclipped) cotangents.
    how: "exact" or "bound" (see `pair_norms`).

  Returns:
    (cotangent of u [blocks, block, d], cotangent of v [blocks, block, d], stats):
    `loss_sum` (the summed loss of the valid pairs), `clipped_fraction` and `grad_norm_mean`
    (over the n^2 valid (i, j) pairs; 0 when not `enabled`).
  """
  num_blocks, block = valid.shape
  flat = lambda x: x.reshape(num_blocks * block, *x.shape[2:])
  v_all, gv_all, valid_all = flat(v), flat(gram_v), flat(valid)

  def logits(u_b, valid_b):
    z = (u_b @ v_all.T) / temperature
    return jnp.where(valid_b[:, None] & valid_all[None, :], z, -1e9)

  def column_lse(acc, xs):  # pass 1: row and column log-normalisers
    u_b, valid_b = xs
    z = logits(u_b, valid_b)
    return jnp.logaddexp(acc, jax.nn.logsumexp(z, axis=0)), jax.nn.logsumexp(z, axis=1)

  col_lse, row_lse = jax.lax.scan(column_lse, jnp.full(valid_all.shape, -1e9),
                                  (u, valid))

  def weights_block(cot_v, xs):  # pass 2: coefficients, clip factors, cotangents
    b, u_b, gu_b, valid_b, row_lse_b = xs
    z = logits(u_b, valid_b)
    pair = valid_b[:, None] & valid_all[None, :]
    diag = (jnp.arange(block)[:, None] + b * block) == jnp.arange(valid_all.size)[None, :]
    p = jnp.exp(z - row_lse_b[:, None])
    q = jnp.exp(z - col_lse[None, :])
    coef = jnp.where(pair, (0.5 * (p + q) - diag) / temperature, 0.0)
    if enabled:
      norms = jnp.where(pair, pair_norms(u_b, v_all, gu_b, gv_all, how), 0.0)
      w = coef * jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
    else:
      norms = jnp.zeros_like(z)
      w = coef
    z_ii = jnp.sum(jnp.where(diag & pair, z, 0.0), axis=1)
    stats = dict(loss=jnp.sum(jnp.where(valid_b, 0.5 * (row_lse_b - z_ii), 0.0)),
                 clipped=jnp.sum(pair & (norms > clip_norm)), norm_sum=jnp.sum(norms),
                 z_ii=z_ii)
    return cot_v + w.T @ u_b, (w @ v_all, stats)

  xs = (jnp.arange(num_blocks), u, gram_u, valid, row_lse)
  cot_v, (cot_u, stats) = jax.lax.scan(weights_block, jnp.zeros_like(v_all), xs)
  col_loss = jnp.where(valid_all, 0.5 * (col_lse - flat(stats["z_ii"])), 0.0)
  pairs = jnp.sum(valid_all) ** 2
  out = dict(loss_sum=jnp.sum(stats["loss"]) + jnp.sum(col_loss),
             clipped_fraction=jnp.sum(stats["clipped"]) / jnp.maximum(pairs, 1),
             grad_norm_mean=jnp.sum(stats["norm_sum"]) / jnp.maximum(pairs, 1))
  return cot_u, cot_v.reshape(v.shape), out


def logit_dp_gradient(model: DualEncoder, params, batch, mask, rngs, noise_key, *,
                      clip_norm: float, noise_std: float, expected_batch_size: int,
                      enabled: bool = True, pair_norm_method: str = "exact", shardings=None,
                      loss_bound: float | None = None, **_):
  """Logit-DP over the whole logical batch [num_micro, micro, ...], in two passes.

  Pass 1 embeds every example (and, when private, forms its Gram matrices); the pairwise
  coefficients and clip factors are computed a micro-batch of rows at a time
  (`pairwise_cotangents`); pass 2 runs one backward pass per micro-batch with the resulting
  cotangents. Non-private: the same two passes
  without clipping (the exact gradient of the summed loss). Returns (gradient, metrics).

  An example whose embeddings or Gram matrices are not finite (a NaN or inf input, or a tower
  that cannot embed it) acts as padding and is counted in `nonfinite`: pass 1's outputs for it
  are replaced by zeros, and pass 2 embeds the zero placeholder in its place, as for padding,
  so that no backward pass meets a NaN. Each term depends on that record only, so dropping it
  is the removal of the record, which the sensitivity covers.

  Args:
    model: the dual encoder.
    params: {"image": ..., "text": ...}.
    batch: a pytree, leaves [num_micro, micro, ...].
    mask: bool [num_micro, micro]; False for padding.
    rngs: per-example PRNG keys; unused (deterministic).
    noise_key: this step's noise key (`secrets.RunSecrets.noise_key`).
    clip_norm: B, the norm each pairwise similarity gradient is clipped to.
    noise_std: sigma * Delta (`logit_dp_sensitivity`), the noise's standard deviation.
    expected_batch_size: q * N, the divisor.
    enabled: False for the non-private baseline (no clipping, no noise, no Gram matrices).
    pair_norm_method: "exact" (keeps the Gram matrices, O(n d^2) memory) or "bound" (keeps only
      their largest eigenvalues, O(n)).
    shardings: the parameters' shardings (`dpsgd.noisy_mean`), or None.
    loss_bound: must be None: a pair's loss depends on every pair of the batch, so no clipped
      loss of a unit bounds one record's influence (the plan refuses the DP loss estimate).

  Returns:
    (gradient estimate shaped like `params`, metrics of `dpsgd.noisy_mean`); there,
    `clipped_fraction` and `grad_norm_mean` are over the valid pairs.
  """
  if loss_bound is not None:
    raise ValueError("logit_dp has no DP loss estimate: its pair losses couple the batch.")
  del rngs
  pi, pt = params["image"], params["text"]

  def embed_micro(_, xs):
    micro, m = xs
    micro = _placeholder(m, micro)
    if enabled:
      u, gu = jax.vmap(lambda x: _gram(model.embed_image, pi, x))(micro)
      v, gv = jax.vmap(lambda x: _gram(model.embed_text, pt, x))(micro)
    else:
      u, v = model.embed(params, micro)
      gu = gv = jnp.zeros(u.shape[:1])
    rows = lambda x: jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), -1)
    finite = rows(u) & rows(v) & rows(gu) & rows(gv)
    if enabled and pair_norm_method == "bound":  # keep [n] eigenvalue maxima, not [n, d, d]
      top = lambda g: jnp.linalg.eigvalsh(jnp.where(finite[:, None, None], g, 0.0))[:, -1]
      gu, gv = top(gu), top(gv)
      finite &= jnp.isfinite(gu) & jnp.isfinite(gv)
    return None, (u, v, gu, gv, finite)

  _, (u, v, gu, gv, finite) = jax.lax.scan(embed_micro, None, (batch, mask))
  valid = mask & finite  # a non-finite example acts as padding (it depends on that record only)
  zero_bad = lambda x: jnp.where(valid.reshape(*mask.shape, *(1,) * (x.ndim - 2)), x, 0.0)
  u, v, gu, gv = map(zero_bad, (u, v, gu, gv))
  cot_u, cot_v, stats = pairwise_cotangents(
      u, v, gu, gv, valid, temperature=model.temperature, clip_norm=clip_norm,
      enabled=enabled, how=pair_norm_method)

  def backward_micro(acc, xs):
    micro, ok, cu, cv = xs
    micro = _placeholder(ok, micro)  # pass 1's verdict: drops a tower's NaN on a finite input too

    def weighted(p):
      eu, ev = model.embed(p, micro)
      return jnp.sum(eu * cu) + jnp.sum(ev * cv)

    g = jax.grad(weighted)(params)
    return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g), None

  cot_u, cot_v = (jnp.where(valid[..., None], c, 0.0) for c in (cot_u, cot_v))  # zero off valid
  total, _ = jax.lax.scan(backward_micro, clipping.zeros_f32(params),
                          (batch, valid, cot_u, cot_v))
  stats["nonfinite"] = jnp.sum(mask & ~finite)
  return dpsgd.noisy_mean(total, stats, mask, noise_key, noise_std=noise_std,
                          expected_batch_size=expected_batch_size, enabled=enabled,
                          shardings=shardings)

