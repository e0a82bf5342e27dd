"""Book-keeping ghost clipping against the vmap reference.

For each objective, on a model shape no demo config uses: the same per-example norms and the
same clipped sum (to 1e-5, float32), with padding, a non-finite example and examples on both
sides of C; both norm forms; layers without a rule, weights read outside their layer and a
layer run twice take the exact fallback and are named; bfloat16 activations stay close to
float32. (tests/parallel/test_multiprocess.py trains with ghost clipping on a sharded mesh along
the loss curve of vmap on one device.)
"""

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.data import sources
from dpvl.objectives import build_objective
from dpvl.privacy import clipping
from dpvl.privacy import contrastive
from dpvl.privacy import ghost
from dpvl.privacy import mechanism as mechanism_lib
from tests.privacy import mlp

NUM_MICRO, MICRO = 2, 3


def _assert_same(got, want, rtol=1e-5):
  """Every leaf equal to `rtol` relative to the largest coordinate of the whole sum (a leaf
  whose exact gradient is zero, like attention's key bias, carries only rounding)."""
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                          strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


_VMAP = jax.jit(clipping.clipped_grad_sum, static_argnums=(0,))
_GHOST = jax.jit(clipping.ghost_clipped_grad_sum, static_argnums=(0,))


def _compare(loss_fn, params, batch, mask, rngs, rtol=1e-5):
  """Ghost against vmap at a clip norm between the examples' norms (C traced: one compilation
  each). Returns the vmap sum, stats and the ghost sum."""
  _, stats = _VMAP(loss_fn, params, batch, mask, rngs, np.inf)
  norms = np.asarray(stats["norms"])
  finite = norms[np.isfinite(norms) & (norms > 0)]
  clip_norm = float(np.median(finite))
  assert np.any(finite < clip_norm) and np.any(finite > clip_norm)  # both sides of C
  want, want_stats = _VMAP(loss_fn, params, batch, mask, rngs, clip_norm)
  got, got_stats = _GHOST(loss_fn, params, batch, mask, rngs, clip_norm)
  np.testing.assert_allclose(got_stats["norms"], want_stats["norms"], rtol=rtol)
  for name in ("loss_sum", "nonfinite"):
    np.testing.assert_allclose(got_stats[name], want_stats[name], rtol=rtol)
  _assert_same(got, want, rtol)
  assert np.all(np.isfinite(mlp.flat(got)))
  return want, want_stats, got


def _objective_batch(config):
  """The objective of `config` and a batch [2, 3] of its examples: the last slot padding
  (NaN), one valid example with a NaN pixel."""
  objective = build_objective(config)
  source = sources.build_source(config.data)
  examples = [objective.prepare(source[i]) for i in range(NUM_MICRO * MICRO)]
  batch = {k: np.stack([e[k] for e in examples]).reshape(NUM_MICRO, MICRO, *v.shape)
           for k, v in examples[0].items()}
  batch["image"][1, 2] = np.nan  # padding
  batch["image"][0, 1, 3, 3, 0] = np.nan  # a valid example that is not finite
  mask = np.ones((NUM_MICRO, MICRO), bool)
  mask[1, 2] = False
  rngs = jax.random.split(jax.random.key(3), NUM_MICRO * MICRO).reshape(NUM_MICRO, MICRO)
  return objective, jax.jit(objective.init)(jax.random.key(0)), batch, mask, rngs


def _odd_dpcap(config):
  """DP-Cap with a width, depth, patch and caption length the demo configs do not use."""
  config.data.image_size = 12
  config.tokenizer.max_len = 11
  config.model.encoder.update(dict(patch_size=2, width=24, depth=1, num_heads=3, mlp_dim=40,
                                   posemb="learn"))
  config.model.decoder.update(dict(width=16, depth=1, num_heads=2, mlp_dim=24))
  return config


@pytest.mark.parametrize("form", ["rule", "gram", "direct"])
def test_dpcap_ghost_equals_vmap(form, dpcap_config, monkeypatch):
  if form != "rule":
    monkeypatch.setattr(ghost.Layer, "gram", property(lambda self: form == "gram"))
  objective, params, batch, mask, rngs = _objective_batch(_odd_dpcap(dpcap_config()))
  plan = ghost.discover(objective.per_example_loss, params, *ghost.one_unit((batch, rngs)))
  if form == "rule":  # 36 patch tokens: direct for the 24-wide layers, Gram for the others
    assert {l.gram for l in plan.layers} == {True, False}
  assert {l.kind for l in plan.layers} == {"dense", "embed"}
  text = plan.describe(params)  # learnt position embeddings: per-example gradients, named
  assert "['vit']['pos_embedding']" in text and "['text']['pos_embedding']" in text, text
  want, stats, got = _compare(objective.per_example_loss, params, batch, mask, rngs)
  norms = np.asarray(stats["norms"])
  assert not np.isfinite(norms[0, 1]) and norms[1, 2] == 0
  if form != "rule":
    return
  # bfloat16 activations: ghost and vmap round differently (ghost multiplies bf16 a and g in
  # float32, vmap rounds each per-example weight gradient to bf16); both stay within 2% of the
  # float32 norms and 5% (of the largest coordinate) of the float32 clipped sum.
  config = _odd_dpcap(dpcap_config())
  config.model.dtype = "bfloat16"
  half = build_objective(config).per_example_loss
  clip_norm = float(np.median(norms[np.isfinite(norms) & (norms > 0)]))
  for fn, full in ((_VMAP, want), (_GHOST, got)):
    total, half_stats = fn(half, params, batch, mask, rngs, clip_norm)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(total))
    np.testing.assert_allclose(half_stats["norms"], norms, rtol=2e-2)
    _assert_same(total, full, rtol=5e-2)


def test_vip_mae_ghost_equals_vmap_with_per_example_masks(dpcap_config):
  from configs import vip_tiny  # pylint: disable=import-outside-toplevel
  config = vip_tiny.get_config()
  config.data.size, config.data.image_size = 64, 12
  config.model.encoder.update(dict(patch_size=3, width=20, depth=1, num_heads=2, mlp_dim=28))
  config.model.decoder.update(dict(width=12, depth=1, num_heads=3, mlp_dim=20))
  del dpcap_config
  objective, params, batch, mask, rngs = _objective_batch(config)
  plan = ghost.discover(objective.per_example_loss, params, *ghost.one_unit((batch, rngs)))
  assert [plan.names[i] for i in plan.reasons] == ["['mask_token']"]
  _compare(objective.per_example_loss, params, batch, mask, rngs)


class _Squared(nn.Dense):
  """A Dense subclass whose map is not x W: its kernel gradient is not a^T g."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features))
    return inputs @ (kernel * kernel)


class _Odd(nn.Module):
  """A Conv (no rule), a Dense subclass (no rule), a tied embedding (read outside its layer)
  and a Dense run twice."""

  @nn.compact
  def __call__(self, x, ids):
    h = nn.Conv(4, (3,), name="conv")(x)  # [T, 4]
    embed = nn.Embed(11, 4, name="embed")
    h = h + embed(ids)
    twice = nn.Dense(4, name="twice")
    h = twice(jnp.tanh(twice(h)))
    h = _Squared(4, name="squared")(h)
    h = nn.Dense(4, name="dense")(nn.LayerNorm(name="norm")(h))
    return embed.attend(h)  # [T, 11]: tied output


def test_layers_without_a_rule_take_the_exact_fallback_and_are_named():
  model = _Odd()
  x = jax.random.normal(jax.random.key(0), (NUM_MICRO, MICRO, 6, 3))
  ids = jax.random.randint(jax.random.key(1), (NUM_MICRO, MICRO, 6), 0, 11)
  params = jax.jit(model.init)(jax.random.key(2), x[0, 0], ids[0, 0])["params"]

  def loss_fn(params, example, rng):
    del rng
    logits = model.apply({"params": params}, example["x"], example["ids"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), example["ids"][:, None], 1))

  batch = dict(x=x, ids=ids)
  rngs = jax.random.split(jax.random.key(3), NUM_MICRO * MICRO).reshape(NUM_MICRO, MICRO)
  plan = ghost.discover(loss_fn, params, *ghost.one_unit((batch, rngs)))
  reasons = {plan.names[i]: why for i, why in plan.reasons.items()}
  assert reasons == {
      "['conv']['bias']": "no layer rule", "['conv']['kernel']": "no layer rule",
      "['embed']['embedding']": "read outside its layer",
      "['squared']['kernel']": "no layer rule",
      "['twice']['bias']": "its layer runs more than once per example",
      "['twice']['kernel']": "its layer runs more than once per example"}
  assert [plan.names[l.kernel] for l in plan.layers] == ["['dense']['kernel']"]
  mask = np.ones((NUM_MICRO, MICRO), bool)
  _compare(loss_fn, params, batch, mask, rngs)


def test_a_loss_without_flax_layers_is_all_fallback():
  params, batch, rngs = mlp.make(scale=3.0)
  mask = np.ones((3, 4), bool)
  mask[2, 1:] = False
  plan = ghost.discover(mlp.loss, params, *ghost.one_unit((batch, rngs)))
  assert plan.layers == () and len(plan.direct) == 3
  _compare(mlp.loss, params, batch, mask, rngs)


def test_the_run_log_names_what_ghost_clipping_covers(dpcap_config):
  config = dpcap_config(clipping="ghost")
  objective = build_objective(config)
  params = jax.eval_shape(objective.init, jax.random.key(0))
  mechanism = mechanism_lib.build_mechanism(config, expected_batch_size=32)
  text = mechanism.report(objective, params, 16)
  assert text.startswith("ghost clipping: ") and "['text']['pos_embedding']" in text, text
  config.privacy.clipping = "vmap"
  assert mechanism_lib.build_mechanism(config, 32).report(objective, params, 16) is None


def test_per_batch_ghost_clips_each_hash_group_as_one_unit(dpclip_config):
  config = dpclip_config()
  config.data.size, config.data.image_size, config.tokenizer.max_len = 64, 12, 9
  config.model.encoder.update(dict(patch_size=4, width=20, depth=2, num_heads=2, mlp_dim=28))
  config.model.text.update(dict(width=12, depth=1, num_heads=3, mlp_dim=20))
  objective = build_objective(config)
  source = sources.build_source(config.data)
  groups, capacity = 3, 4
  examples = [objective.prepare(source[i]) for i in range(groups * capacity)]
  batch = {k: np.stack([e[k] for e in examples]).reshape(groups, capacity, *v.shape)
           for k, v in examples[0].items()}
  mask = np.ones((groups, capacity), bool)
  mask[2, 3] = False
  batch["image"][2, 3] = np.nan  # padding
  batch["image"][0, 1, 0, 0, 0] = np.nan  # drops group 0 whole
  params = jax.jit(objective.init)(jax.random.key(0))
  dual = objective.dual_encoder
  rngs = jax.random.split(jax.random.key(1), groups * capacity).reshape(groups, capacity)
  gradients = {strategy: jax.jit(lambda p, b, m, r, c, s=strategy: contrastive.per_batch_gradient(
      dual, p, b, m, r, jax.random.key(2), clip_norm=c, noise_std=0.0, expected_batch_size=1,
      clipping_strategy=s)) for strategy in ("vmap", "ghost")}
  _, unclipped = gradients["vmap"](params, batch, mask, rngs, np.inf)
  # The mean of the two finite groups' norms: one group above C, one below.
  clip_norm = float(unclipped["grad_norm_mean"]) * groups / 2
  results = {s: fn(params, batch, mask, rngs, clip_norm) for s, fn in gradients.items()}
  (want, want_metrics), (got, got_metrics) = results["vmap"], results["ghost"]
  _assert_same(got, want)
  assert np.all(np.isfinite(mlp.flat(got)))
  for name in ("loss", "nonfinite", "clipped_fraction", "grad_norm_mean"):
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5)
  assert int(got_metrics["nonfinite"]) == capacity and float(got_metrics["clipped_fraction"]) > 0
  plan = ghost.discover(functools.partial(contrastive.group_unit_loss, dual), params,
                        ghost.one_unit((batch, mask), axes=1))
  assert {plan.names[l.kernel].split("]")[0] for l in plan.layers} == {"['image'", "['text'"}
  # Image: patch embedding, 6 dense per block x 2, projection; text: token embedding, 6 x 1,
  # projection. Only the LayerNorms and the text positions take per-example gradients.
  assert len(plan.layers) == 14 + 8
  assert [plan.names[i] for i in plan.reasons] == ["['text']['pos_embedding']"]
