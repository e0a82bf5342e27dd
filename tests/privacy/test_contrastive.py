"""DP-CLIP's mechanisms: the loss, Logit-DP's pair norms and clipped sum against brute force,
hash groups, and the declared sensitivities measured on random and adversarial neighbours."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.privacy import contrastive
from dpvl.privacy.sampling import Selection

jax.config.update("jax_enable_x64", False)

GRADIENTS = dict(per_batch=contrastive.per_batch_gradient, logit_dp=contrastive.logit_dp_gradient)
TAU = 0.5
DIM = 4


def _normalize(x):
  """x / ||x||, finite at x = 0 (the zero placeholder of invalid examples) like
  `dpvl.models.clip.l2_normalize`."""
  return x / jnp.sqrt(jnp.sum(x * x) + 1e-12)


def _toy_model(tau=TAU):
  """Linear towers: u = normalize(W x), v = normalize(V tanh(A y)); any embedding is reachable
  by choosing the input, which lets tests place adversarial pairs."""
  return contrastive.DualEncoder(
      embed_image=lambda p, ex: _normalize(p["W"] @ ex["x"]),
      embed_text=lambda p, ex: _normalize(p["V"] @ jnp.tanh(p["A"] @ ex["y"])),
      temperature=tau)


def _toy_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  eye = jnp.eye(DIM)
  return dict(image=dict(W=eye + 0.3 * jax.random.normal(k[0], (DIM, DIM))),
              text=dict(V=eye + 0.3 * jax.random.normal(k[1], (DIM, DIM)),
                        A=eye + 0.3 * jax.random.normal(k[2], (DIM, DIM))))


def _batch(xs, ys, num_micro, micro):
  """Pairs (xs[i], ys[i]) in the first slots of a padded [num_micro, micro] batch."""
  n = len(xs)
  cap = num_micro * micro
  x = np.zeros((cap, DIM), np.float32)
  y = np.zeros((cap, DIM), np.float32)
  x[:n], y[:n] = xs, ys
  x[n:], y[n:] = 1.0, 1.0  # padding content must not matter
  mask = np.arange(cap) < n
  shape = lambda a: jnp.asarray(a.reshape(num_micro, micro, *a.shape[1:]))
  return dict(x=shape(x), y=shape(y)), shape(mask)


def _clipped_sum(mechanism, model, params, batch, mask, clip_norm, **kw):
  grad, _ = GRADIENTS[mechanism](
      model, params, batch, mask, None, jax.random.key(0), clip_norm=clip_norm, noise_std=0.0,
      expected_batch_size=1, enabled=True, **kw)
  return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)]).astype(np.float64)


def test_contrastive_losses_match_a_loop_and_ignore_padding():
  rng = np.random.default_rng(0)
  n, cap = 5, 8
  sims = rng.uniform(-1, 1, (cap, cap))
  mask = np.arange(cap) < n
  got = np.asarray(contrastive.contrastive_losses(jnp.asarray(sims), jnp.asarray(mask), TAU))
  z = sims[:n, :n] / TAU
  for i in range(n):
    row = -z[i, i] + math.log(np.sum(np.exp(z[i])))
    col = -z[i, i] + math.log(np.sum(np.exp(z[:, i])))
    assert got[i] == pytest.approx(0.5 * (row + col), rel=1e-5)
  assert np.all(got[n:] == 0)
  other = sims.copy()
  other[n:, :] = 9.0
  other[:, n:] = -9.0
  again = contrastive.contrastive_losses(jnp.asarray(other), jnp.asarray(mask), TAU)
  np.testing.assert_allclose(np.asarray(again), got, rtol=1e-6)


def _pair_grads(model, params, batch, mask):
  """Brute force: grad of s_ij for every valid pair, one jax.grad per pair."""
  flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), batch)
  idx = np.flatnonzero(np.asarray(mask).reshape(-1))

  def sim(p, i, j):
    u = model.embed_image(p["image"], jax.tree.map(lambda a: a[i], flat))
    v = model.embed_text(p["text"], jax.tree.map(lambda a: a[j], flat))
    return u @ v

  grad = jax.jit(jax.grad(sim))
  out = {}
  for i in idx:
    for j in idx:
      g = grad(params, i, j)
      out[i, j] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
  return out


def test_logit_dp_pair_norms_and_clipped_sum_match_brute_force():
  model, params = _toy_model(), _toy_params()
  rng = np.random.default_rng(1)
  n, clip = 6, 0.4
  batch, mask = _batch(rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM)), 2, 4)
  grads = _pair_grads(model, params, batch, mask)

  flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), batch)
  u, gu = jax.vmap(lambda x: contrastive._gram(model.embed_image, params["image"], x))(flat)
  v, gv = jax.vmap(lambda x: contrastive._gram(model.embed_text, params["text"], x))(flat)
  exact = np.asarray(contrastive.pair_norms(u, v, gu, gv, "exact"))
  bound = np.asarray(contrastive.pair_norms(u, v, gu, gv, "bound"))
  for (i, j), g in grads.items():
    assert exact[i, j] == pytest.approx(np.linalg.norm(g), rel=1e-4)
    assert bound[i, j] >= np.linalg.norm(g) * (1 - 1e-5)

  # sum_ij dL/ds_ij clip_B(grad s_ij), by brute force
  sims = np.asarray(u @ v.T)
  coef = np.asarray(jax.grad(lambda s: jnp.sum(contrastive.contrastive_losses(
      s, mask.reshape(-1), TAU)))(jnp.asarray(sims)))
  want = sum(coef[i, j] * g * min(1.0, clip / np.linalg.norm(g)) for (i, j), g in grads.items())
  got = _clipped_sum("logit_dp", model, params, batch, mask, clip)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
  for how in contrastive.PAIR_NORMS:  # every clipped pair gradient is at most B
    g_bound = _clipped_sum("logit_dp", model, params, batch, mask, clip, pair_norm_method=how)
    assert np.linalg.norm(g_bound) <= clip * np.abs(coef).sum() * (1 + 1e-5)


def test_logit_dp_without_clipping_is_the_exact_gradient_across_micro_batches():
  model, params = _toy_model(), _toy_params(2)
  rng = np.random.default_rng(2)
  batch, mask = _batch(rng.normal(size=(7, DIM)), rng.normal(size=(7, DIM)), 3, 4)

  def loss(p):
    u, v = model.embed(p, jax.tree.map(lambda a: a.reshape(-1, DIM), batch))
    return jnp.sum(contrastive.contrastive_losses(u @ v.T, mask.reshape(-1), TAU))

  want = np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.grad(loss)(params))])
  for enabled, clip in ((False, 1.0), (True, 1e6)):
    grad, metrics = contrastive.logit_dp_gradient(
        model, params, batch, mask, None, jax.random.key(0), clip_norm=clip, noise_std=0.0,
        expected_batch_size=1, enabled=enabled)
    got = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss(params)) / 7, rel=1e-5)


MARKER = 7.0  # a finite pixel value on which `_fragile_model`'s image tower overflows
NONFINITE_RUNS = {  # name: (mechanism, keyword arguments)
    "logit_dp_exact": ("logit_dp", dict(pair_norm_method="exact")),
    "logit_dp_bound": ("logit_dp", dict(pair_norm_method="bound")),
    "logit_dp_nonprivate": ("logit_dp", dict(enabled=False)),
    "per_batch": ("per_batch", {}),
}


def _fragile_model():
  """`_toy_model` whose image tower overflows (inf, then NaN, forward and backward) on any
  image that contains MARKER: a finite input that the tower cannot embed."""
  toy = _toy_model()

  def embed_image(p, ex):
    scale = jnp.where(jnp.any(ex["x"] == MARKER), jnp.inf, 1.0)
    return toy.embed_image(p, dict(ex, x=ex["x"] * scale))

  return dataclasses.replace(toy, embed_image=embed_image)


@functools.cache
def _nonfinite_run(name):
  """Jitted (batch, mask) -> (flat gradient, nonfinite) of one NONFINITE_RUNS entry (noise off)."""
  mechanism, kw = NONFINITE_RUNS[name]
  model, params = _fragile_model(), _toy_params(4)

  def run(batch, mask):
    grad, metrics = GRADIENTS[mechanism](
        model, params, batch, mask, None, jax.random.key(0), clip_norm=0.3, noise_std=0.0,
        expected_batch_size=1, **kw)
    return jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(grad)]), metrics["nonfinite"]

  return jax.jit(run)


@pytest.mark.parametrize("bad", ["nan_pixel", "inf_pixel", "tower_overflow"])
@pytest.mark.parametrize("name", list(NONFINITE_RUNS))
def test_a_nonfinite_example_acts_as_padding(name, bad):
  """A record with a NaN or inf pixel, or one that its tower cannot embed, leaves no trace in
  the gradient: it is dropped like padding (Logit-DP), or drops its group (per-batch), and no
  coordinate turns non-finite (0 x NaN in a backward pass would reveal the record)."""
  run = _nonfinite_run(name)
  rng = np.random.default_rng(7)
  slot = (0, 1)  # micro-batch (per-batch: group) 0, which holds 4 valid pairs
  clean, mask = _batch(rng.normal(size=(6, DIM)), rng.normal(size=(6, DIM)), 2, 4)
  x = np.array(clean["x"])
  x[slot + (2,)] = dict(nan_pixel=np.nan, inf_pixel=np.inf, tower_overflow=MARKER)[bad]
  poisoned = dict(clean, x=jnp.asarray(x))
  without_slot = mask.at[slot].set(False)
  logit_dp = NONFINITE_RUNS[name][0] == "logit_dp"
  dropped = without_slot if logit_dp else mask.at[0].set(False)

  grad, nonfinite = run(poisoned, mask)
  print(f"{name} {bad}: {int(np.sum(~np.isfinite(grad)))} of {grad.size} coordinates not finite")
  assert np.all(np.isfinite(grad))
  assert int(nonfinite) == (1 if logit_dp else 4)
  want, none = run(clean, dropped)
  assert int(none) == 0
  np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6 * np.abs(want).max())
  # the bad content in a padding slot does not matter either
  padded, none = run(poisoned, without_slot)
  want, _ = run(clean, without_slot)
  assert int(none) == 0
  np.testing.assert_allclose(padded, want, rtol=0, atol=1e-6 * np.abs(want).max())


def _embedding_inputs(params, targets_u, targets_v):
  """Inputs whose embeddings are the given unit directions (inverting the toy towers)."""
  w, vmat, a = (np.asarray(params["image"]["W"], np.float64),
                np.asarray(params["text"]["V"], np.float64),
                np.asarray(params["text"]["A"], np.float64))
  xs = np.linalg.solve(w, np.asarray(targets_u).T).T
  hidden = 0.5 * np.linalg.solve(vmat, np.asarray(targets_v).T).T  # tanh(A y) = hidden
  hidden = hidden / np.abs(hidden).max(axis=1, keepdims=True) * 0.9
  ys = np.linalg.solve(a, np.arctanh(hidden).T).T
  return xs, ys


def _neighbours(rng, params, n, kind):
  """(pairs of D, the extra pair k) for one kind of neighbouring batch."""
  e1 = np.eye(DIM)[0]
  if kind == "random":
    return (rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM))), (
        rng.normal(size=DIM), rng.normal(size=DIM))
  if kind == "extreme":  # huge and tiny inputs
    scale = 10.0 ** rng.uniform(-3, 3, size=(n, 1))
    return (scale * rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM))), (
        1e3 * rng.normal(size=DIM), 1e-3 * rng.normal(size=DIM))
  if kind == "hardest_negative":
    # Every other pair is badly aligned (s_ii ~ -0.4); pair k's caption is close to every image
    # (their hardest negative) and its image close to every caption. Away from s = +-1, where
    # the similarity gradients vanish.
    e2, e3 = np.eye(DIM)[1], np.eye(DIM)[2]
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    us = unit(e1 + 0.2 * rng.normal(size=(n, DIM)))
    vs = unit(-0.5 * e1 + e2 + 0.2 * rng.normal(size=(n, DIM)))
    xs, ys = _embedding_inputs(params, us, vs)
    xk, yk = _embedding_inputs(params, unit(-0.5 * e1 + e2 + 0.3 * e3)[None],
                               unit(e1 + 0.3 * e3)[None])
    return (xs, ys), (xk[0], yk[0])
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "extreme", "hardest_negative"])
def test_logit_dp_sensitivity_is_never_exceeded(kind):
  """||g(D + k) - g(D)|| <= Delta (add/remove) and <= 2 Delta (replace), measured."""
  model, params = _toy_model(), _toy_params(3)
  rng = np.random.default_rng({"random": 0, "extreme": 1, "hardest_negative": 2}[kind])
  num_micro, micro, clip = 2, 8, 0.05  # B small: every pair gradient is clipped to B
  declared = contrastive.logit_dp_sensitivity(clip, TAU, num_micro * micro)
  worst = 0.0
  for trial in range(6):
    n = int(rng.integers(1, num_micro * micro))  # D has n pairs, D + k has n + 1 <= capacity
    (xs, ys), (xk, yk) = _neighbours(rng, params, n, kind)
    pos = int(rng.integers(0, n + 1))  # k's slot in the batch: anywhere
    with_k = (np.insert(xs, pos, xk, 0), np.insert(ys, pos, yk, 0))
    g_without = _clipped_sum("logit_dp", model, params, *_batch(xs, ys, num_micro, micro), clip)
    g_with = _clipped_sum("logit_dp", model, params, *_batch(*with_k, num_micro, micro), clip)
    moved = np.linalg.norm(g_with - g_without)
    assert moved <= declared * (1 + 1e-5), (kind, trial, moved, declared)
    worst = max(worst, moved / declared)
    # replace one pair of D by k: a removal and an addition
    j = int(rng.integers(0, n))
    replaced = (xs.copy(), ys.copy())
    replaced[0][j], replaced[1][j] = xk, yk
    g_rep = _clipped_sum("logit_dp", model, params, *_batch(*replaced, num_micro, micro), clip)
    assert np.linalg.norm(g_rep - g_without) <= 2 * declared * (1 + 1e-5)
  print(f"logit_dp {kind}: worst measured / declared sensitivity = {worst:.3f}")
  assert worst > 0


def test_logit_dp_sensitivity_is_o1_in_the_batch_size():
  few = contrastive.logit_dp_sensitivity(1.0, 0.5, 100)
  many = contrastive.logit_dp_sensitivity(1.0, 0.5, 1_000_000)
  assert many < 1.02 * contrastive.logit_dp_sensitivity(1.0, 0.5, 10_000)
  assert few < many < (2 + 2 * math.exp(4.0)) / 0.5 + 1e-9
  # a cold temperature gives the bound back to the batch size
  assert contrastive.logit_dp_sensitivity(1.0, 0.05, 1_000) == pytest.approx(
      (2 + 2 * 999) / 0.05, rel=1e-6)


def test_plain_per_example_clipping_violates_its_bound():
  """Clipping each pair's gradient of its own contrastive loss to C does not bound the move
  of the sum by C: the added pair changes every other pair's loss."""
  model, params = _toy_model(), _toy_params(3)
  rng = np.random.default_rng(5)
  clip, n = 0.05, 15

  def per_example_clipped_sum(xs, ys):
    ex = dict(x=jnp.asarray(xs, jnp.float32), y=jnp.asarray(ys, jnp.float32))
    mask = jnp.ones(len(xs), bool)

    def losses(p):
      u, v = model.embed(p, ex)
      return contrastive.contrastive_losses(u @ v.T, mask, TAU)

    jac = jax.jacrev(losses)(params)  # per-pair gradients of l_i
    per = np.concatenate([np.asarray(g).reshape(len(xs), -1) for g in jax.tree.leaves(jac)], 1)
    norms = np.linalg.norm(per, axis=1, keepdims=True)
    return np.sum(per * np.minimum(1.0, clip / norms), axis=0)

  # Well-aligned pairs (low loss, small gradients) and a new pair that is a hard negative for
  # all of them: every other pair's gradient grows.
  worst = 0.0
  for _ in range(5):
    us = rng.normal(size=(n, DIM))
    us /= np.linalg.norm(us, axis=1, keepdims=True)
    xs, ys = _embedding_inputs(params, us, us)
    k = us.mean(0) / np.linalg.norm(us.mean(0))
    xk, yk = _embedding_inputs(params, k[None], k[None])
    moved = np.linalg.norm(per_example_clipped_sum(np.vstack([xs, xk]), np.vstack([ys, yk]))
                           - per_example_clipped_sum(xs, ys))
    worst = max(worst, moved / clip)
  print(f"plain per-example clipping: adding one pair moved the sum by {worst:.2f} C")
  assert worst > 1.5


def test_hash_groups_move_only_the_added_record():
  rng = np.random.default_rng(0)
  groups, cap = 8, 24
  chosen = rng.choice(10_000, size=60, replace=False)

  def layout(indices):
    sel = Selection(np.asarray(indices, np.int64), np.ones(len(indices), bool), len(indices), 0)
    return contrastive.hash_groups(sel, key=1234, step=7, groups=groups, group_capacity=cap)

  base = layout(chosen)
  assert base.indices.shape == (groups * cap,) and base.size == 60 and base.truncated == 0
  assert sorted(base.indices[base.mask]) == sorted(chosen)
  extra = 10_001
  with_k = layout(np.append(rng.permutation(chosen), extra))  # order of selection is irrelevant
  members = lambda s: [set(s.indices[g * cap:(g + 1) * cap][s.mask[g * cap:(g + 1) * cap]])
                       for g in range(groups)]
  changed = [g for g, (a, b) in enumerate(zip(members(base), members(with_k))) if a != b]
  assert len(changed) == 1 and members(with_k)[changed[0]] - members(base)[changed[0]] == {extra}
  # fresh groups every step, stable within a step
  g7 = contrastive.group_of(chosen, 1234, 7, groups)
  assert np.array_equal(g7, contrastive.group_of(chosen, 1234, 7, groups))
  assert not np.array_equal(g7, contrastive.group_of(chosen, 1234, 8, groups))
  # overflowing a group truncates and counts
  small = contrastive.hash_groups(Selection(chosen, np.ones(60, bool), 60, 0), 1234, 7, groups, 2)
  assert small.size == 16 and small.truncated == 44


def test_hash_group_sizes_follow_the_accounting_model():
  """Group sizes are Binomial(N, q / groups), the model of `accounting.truncation_probability`."""
  from scipy import stats
  groups, n, q = 4, 200_000, 0.002
  sizes = []
  rng = np.random.default_rng(1)
  for step in range(200):
    chosen = rng.choice(n, size=rng.binomial(n, q), replace=False)
    sizes.extend(np.bincount(contrastive.group_of(chosen, 99, step, groups), minlength=groups))
  sizes = np.asarray(sizes)
  mean, var = n * q / groups, n * q / groups * (1 - q / groups)
  assert abs(sizes.mean() - mean) < 4 * math.sqrt(var / len(sizes))
  assert stats.chi2(len(sizes) - 1).cdf(np.sum((sizes - mean) ** 2) / var) < 0.9999


@pytest.mark.parametrize("strategy", ["vmap", "ghost"])
def test_per_batch_dp_loss_clips_each_groups_summed_loss(strategy):
  """Per-batch clipping's unit is the hash group: the DP loss estimate clips each group's summed
  loss, not each pair's (one record moves one group's)."""
  model, params = _toy_model(), _toy_params()
  rng = np.random.default_rng(3)
  batch, mask = _batch(rng.normal(size=(7, DIM)), rng.normal(size=(7, DIM)), 2, 4)  # 4 + 3 pairs

  def run(bound):
    return contrastive.per_batch_gradient(
        model, params, batch, mask, None, jax.random.key(0), clip_norm=1.0, noise_std=0.0,
        expected_batch_size=7, clipping_strategy=strategy, loss_bound=bound,
        loss_noise_std=0.0, loss_noise_key=jax.random.key(1))[1]

  def group_loss(g):
    u, v = model.embed(params, jax.tree.map(lambda x: x[g], batch))
    return float(jnp.sum(contrastive.contrastive_losses(u @ v.T, mask[g], TAU)))

  group_losses = [group_loss(0), group_loss(1)]
  loose = run(1e6)
  assert float(loose["dp_loss"]) == pytest.approx(sum(group_losses) / 7, rel=1e-5)
  assert float(loose["loss"]) == pytest.approx(sum(group_losses) / 7, rel=1e-5)
  bound = 0.9 * min(group_losses)  # below each group's summed loss: both are clipped
  assert float(run(bound)["dp_loss"]) == pytest.approx(2 * bound / 7, rel=1e-6)
