"""ViP-MAE: masks, masked-only loss, fixed position embeddings, per-example gradients."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import vip_tiny
from dpvl import objectives
from dpvl import optim
from dpvl import train
from dpvl.data import sources
from dpvl.objectives import build_objective
from dpvl.objectives import vip_mae
from dpvl.privacy import plan as plan_lib
from tests.helpers import raises_config_error


def small_vip_config():
  c = vip_tiny.get_config()
  c.steps = 4
  c.data.size = 1_000
  c.data.image_size = 16
  c.model.encoder.update(dict(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.decoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.batch.expected_size = 16
  c.batch.microbatch_size = 8
  c.privacy.noise_multiplier = 1.0
  c.privacy.target_epsilon = None
  c.privacy.seed = 7
  c.log_every = 2
  c.checkpoint_every = 2
  c.evals = ml_collections.ConfigDict()
  return c


def _objective_and_batch(n=6):
  config = small_vip_config()
  objective = build_objective(config)
  source = sources.build_source(config.data)
  images = jnp.stack([objective.prepare(source[i])["image"] for i in range(n)])
  return config, objective, jax.jit(objective.init)(jax.random.key(0)), dict(image=images)


def test_masks_differ_between_examples_and_cover_the_ratio():
  keeps = [np.asarray(vip_mae.random_keep(jax.random.key(i), 64, 16)) for i in range(20)]
  assert all(len(np.unique(k)) == 16 and k.min() >= 0 and k.max() < 64 for k in keeps)
  assert len({tuple(k) for k in keeps}) == 20
  assert vip_mae.num_visible(196, 0.75) == 49 and vip_mae.num_visible(16, 0.75) == 4
  # Every patch is masked about 75% of the time over many draws.
  counts = np.zeros(64)
  for i in range(400):
    counts[np.asarray(vip_mae.random_keep(jax.random.key(1000 + i), 64, 16))] += 1
  assert abs(1 - counts.mean() / 400 - 0.75) < 1e-9 and counts.min() > 60 and counts.max() < 140


def test_loss_counts_masked_patches_only():
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
  pred = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
  keep = jnp.array([0, 5, 9, 15])
  loss = vip_mae.masked_patch_loss(pred, target, keep)
  masked = np.setdiff1d(np.arange(16), keep)
  want = np.mean((np.asarray(pred) - np.asarray(target))[masked] ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(  # visible patches' predictions do not matter
      vip_mae.masked_patch_loss(pred.at[keep].set(1e3), target, keep), loss, rtol=1e-6)
  assert vip_mae.masked_patch_loss(pred.at[masked[0]].set(1e3), target, keep) > loss


def test_position_embeddings_are_fixed_and_the_mask_comes_from_the_example_key():
  config, objective, params, batch = _objective_and_batch()
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert not any("pos" in n for n in names), names  # nothing an optimizer step could change
  learned = small_vip_config()
  learned.model.encoder.posemb = "learn"  # the check above would see a learned table
  learned_params = jax.jit(build_objective(learned).init)(jax.random.key(0))
  assert any("pos_embedding" in jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(learned_params)[0])
  state_params = params
  optimizer = optim.make_optimizer(optim.settings(config), 10)
  plan = plan_lib.build_plan(config)
  step = jax.jit(train.make_train_step(plan.mechanism.gradient(objective), optimizer, plan))
  state = dict(params=state_params, opt_state=optimizer.init(params), step=jnp.ones((), jnp.int32))
  batch2 = jax.tree.map(lambda x: x.reshape(2, 3, *x.shape[1:]), batch)
  new, _ = step(state, batch2, jnp.ones((2, 3), bool), jax.random.key(1), jax.random.key(2))
  assert jax.tree.structure(new["params"]) == jax.tree.structure(params)
  # Same example, different keys: different masks, different losses.
  example = jax.tree.map(lambda x: x[0], batch)
  losses = {float(objective.per_example_loss(params, example, jax.random.key(i)))
            for i in range(4)}
  assert len(losses) == 4


def test_mae_per_example_grads_match_a_loop_with_the_same_masks():
  _, objective, params, batch = _objective_and_batch()
  rngs = jax.random.split(jax.random.key(3), 6)
  grads = jax.jit(jax.vmap(jax.grad(objective.per_example_loss), in_axes=(None, 0, 0)))(
      params, batch, rngs)
  single = jax.jit(jax.grad(objective.per_example_loss))
  for i in range(6):
    g = single(params, jax.tree.map(lambda x, i=i: x[i], batch), rngs[i])
    jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5),
                 grads, g)


def test_mae_trains_privately_end_to_end(tmp_path):
  config = small_vip_config()
  entry = train.run(config, str(tmp_path), log=lambda *_: None)
  assert entry["steps_done"] == 4 and entry["epsilon_spent"] > 0
  assert os.path.exists(tmp_path / "metrics.jsonl")


def test_stage2_on_private_scenes_starts_from_a_synthetic_stage1(tmp_path):
  from dpvl import checkpoint as checkpoint_lib
  stage1 = small_vip_config()
  stage1.data.source = "procedural"  # as configs/vip_synthetic.py: no privacy cost
  stage1.privacy.enabled = False
  stage1.steps = 2
  train.run(stage1, str(tmp_path / "stage1"), log=lambda *_: None)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "stage1" / "checkpoints"))
  stage1_params = ckpt.restore_state_arrays()["params"]
  ckpt.close()

  stage2 = small_vip_config()
  stage2.init_from = str(tmp_path / "stage1")
  stage2.steps = 1
  entry = train.run(stage2, str(tmp_path / "stage2"), log=lambda *_: None)
  assert entry["steps_done"] == 1 and entry["epsilon_spent"] == pytest.approx(
      plan_lib.build_plan(stage2).epsilon(1))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "stage2" / "checkpoints"))
  after = ckpt.restore_state_arrays(step=1)["params"]
  assert ckpt.restore_meta(step=1)["ledger"]["init_from"]["data"]["source"] == "procedural"
  ckpt.close()
  # Warm-up starts at learning rate 0: after one step the parameters are still stage 1's.
  jax.tree.map(np.testing.assert_array_equal, after, stage1_params)


def test_paper_config_accounts_like_the_paper():
  from configs import vip_laion233m
  config = vip_laion233m.get_config()
  config.privacy.noise_multiplier = 0.48
  config.data.size = 233_000_000  # the published row's N
  config.privacy.delta = 1 / (2 * 233_000_000)
  summary = plan_lib.build_plan(config).summary()
  assert (summary["steps"], summary["expected_batch_size"], summary["clip_norm"]) == (
      6_000, 98_304, 0.1)
  assert summary["accountant"] == "rdp" and summary["epsilon_planned"] == summary["epsilon_rdp"]
  assert summary["epsilon_rdp"] == pytest.approx(7.996, abs=1e-3)
  build_objective(config)  # the ViT-B/16 MAE builds from the config


def _timm_block(width: int, mlp: int, qkv_bias: bool = True) -> int:
  """Parameters of one timm `Block`: 2 LayerNorms, qkv, proj, fc1, fc2 (biases but qkv's)."""
  return (4 * width + 3 * width * width + (3 * width if qkv_bias else 0) + width * width + width
          + 2 * width * mlp + mlp + width)


# timm's vit_base_patch16_224 less its classifier head (768 x 1,000 + 1,000) and position table
# (197 x 768, fixed sin-cos in MAE, a constant here): patch embedding, cls, 12 blocks, norm.
VIT_B16 = 86_567_656 - 769_000 - 197 * 768


def test_paper_mae_builds_at_full_size():
  from configs import vip_laion233m
  objective = build_objective(vip_laion233m.get_config())
  shapes = jax.eval_shape(objective.init, jax.random.key(0))  # nothing is allocated
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  encoder = size(shapes["vit"])
  decoder = size(shapes) - encoder
  print(f"ViP paper MAE: {size(shapes):,} parameters (ViT-B/16 {encoder:,}, decoder {decoder:,})")
  assert encoder == VIT_B16 == 16 * 16 * 3 * 768 + 768 + 768 + 12 * _timm_block(768, 3072) + 1536
  # MAE's mae_vit_base_patch16_dec512d4b decoder: decoder_embed, mask token, 4 blocks, norm, pred.
  assert decoder == 768 * 512 + 512 + 512 + 4 * _timm_block(512, 2048) + 1024 + 512 * 768 + 768
  assert shapes["vit"]["cls_token"].shape == (768,)  # learnt, carried through the decoder
  assert not any(jax.tree.leaves(objectives.frozen_mask(objective, shapes)))
  example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), objective.example_spec)
  keep = jnp.zeros((1, vip_mae.num_visible(196, 0.75)), jnp.int32)
  pred = jax.eval_shape(objective.model.apply, {"params": shapes}, example["image"][None], keep)
  assert pred.shape == (1, 196, 16 * 16 * 3)  # every patch, not the class token
  loss = jax.eval_shape(objective.per_example_loss, shapes, example, jax.random.key(0))
  assert loss.shape == () and loss.dtype == jnp.float32


def test_the_decoder_options_are_checked_at_build():
  config = small_vip_config()
  config.model.decoder.gelu = "relu"
  with raises_config_error(r"config.model.decoder.gelu='relu' is unknown; use 'tanh' or 'exact'"):
    build_objective(config)
