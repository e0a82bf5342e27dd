"""Few-shot classification: near 1 on separable features, at chance on features independent of
the labels; nested shots per seed; as an evaluator on a captioner's encoder."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import evals as eval_configs
from dpvl import config as config_lib
from dpvl import evaluate
from dpvl.evaluate import few_shot
from dpvl.objectives import build_objective

SHOTS = (1, 2, 5, 10)


def _blobs(n, num_classes, dim, separation, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * separation
  y = rng.integers(num_classes, size=n)
  return centres[y] + rng.normal(size=(n, dim)), y


def test_separable_classes_are_learnt_from_one_shot_and_noise_stays_at_chance():
  x, y = _blobs(700, 5, 16, separation=3.0, seed=0)
  pool_x, pool_y, test_x, test_y = x[:200], y[:200], x[200:], y[200:]
  draws = [few_shot.draw_shots(pool_y, 5, max(SHOTS), seed) for seed in range(3)]
  good = few_shot.few_shot_metrics(pool_x, pool_y, test_x, test_y, 5, draws, SHOTS)
  assert set(good) == {f"{k}shot/{m}" for k in SHOTS for m in ("top1", "top1_std")}
  for k in SHOTS:
    assert good[f"{k}shot/top1"] > 0.95 and good[f"{k}shot/top1_std"] < 0.05
  noise = np.random.default_rng(1).normal(size=x.shape)
  bad = few_shot.few_shot_metrics(noise[:200], pool_y, noise[200:], test_y, 5, draws, SHOTS)
  for k in SHOTS:
    assert 0.1 < bad[f"{k}shot/top1"] < 0.32  # chance 0.2; 500 test points, 3 seeds


def test_features_are_centred_on_the_few_shot_set_and_normalised():
  # A large shared offset would dominate unnormalised features: centring removes it.
  x, y = _blobs(400, 3, 8, separation=3.0, seed=2)
  x = x + 1e3
  train, test = few_shot.centre_and_normalise(x[:30], x[30:])
  np.testing.assert_allclose(np.linalg.norm(train, axis=1), 1.0, rtol=1e-6)
  draws = [few_shot.draw_shots(y[:100], 3, 5, 0)]
  got = few_shot.few_shot_metrics(x[:100], y[:100], x[100:], y[100:], 3, draws, (5,))
  assert got["5shot/top1"] > 0.9


def test_draws_are_per_class_nested_and_seeded():
  labels = np.repeat(np.arange(4), 6)
  a = few_shot.draw_shots(labels, 4, 5, seed=0)
  assert a.shape == (4, 5) and len(np.unique(a)) == 20
  assert np.all(labels[a] == np.arange(4)[:, None])
  np.testing.assert_array_equal(a, few_shot.draw_shots(labels, 4, 5, seed=0))
  assert not np.array_equal(a, few_shot.draw_shots(labels, 4, 5, seed=1))
  with pytest.raises(ValueError, match="class 0 has 6 examples"):
    few_shot.draw_shots(labels, 4, 7, seed=0)


def _config(dpcap_config, **fields):
  c = dpcap_config()
  c.evals = ml_collections.ConfigDict(dict(fs=eval_configs.scene_few_shot(
      "colour_label", blocks=1, shots=(1, 5), seeds=2, train_size=120, test_size=100,
      image_size=16)))
  c.evals.fs.update(fields)
  return c


def test_few_shot_evaluator_on_the_captioners_encoder(dpcap_config):
  config = _config(dpcap_config)
  config.evals.held_out = config.evals.fs.copy_and_resolve_references()
  config.evals.held_out.test_data = dict(config.evals.fs.data, seed=7, size=100)
  objective = build_objective(config)
  params = jax.jit(objective.init)(jax.random.key(0))
  for evaluator in evaluate.build_evaluators(config, objective):  # fs, then held_out
    metrics = evaluator(params)
    name = evaluator.name
    names = {f"{name}/{k}shot/{m}" for k in (1, 5) for m in ("top1", "top1_std")}
    assert set(metrics) == names | {f"{name}/chance", f"{name}/skipped"}
    assert metrics[f"{name}/chance"] == pytest.approx(1 / 7)
    assert metrics[f"{name}/skipped"] == 0
    assert all(0.0 <= metrics[n] <= 1.0 for n in names)


def test_a_pool_without_enough_shots_per_class_is_a_config_error(dpcap_config):
  config = _config(dpcap_config, train_size=20, test_size=10, shots=(10,))
  with pytest.raises(config_lib.ConfigError, match="config.evals.fs.train_size=20: class"):
    evaluate.build_evaluators(config, build_objective(config))


def test_the_paper_builders_name_registered_evaluators():
  built = [eval_configs.imagenet_few_shot(blocks=12, data_dir="/data/tfds"),
           eval_configs.imagenet_caption_zero_shot(["tench", "goldfish"]),
           eval_configs.caption_order("/data/aro/vg_relation.json")]
  assert [c.type for c in built] == ["few_shot", "caption_zero_shot", "caption_order"]
  assert all(c.type in evaluate.REGISTRY for c in built)
  assert (built[0].data.split, built[0].test_data.split) == ("train", "validation")
  assert built[0].data.data_dir == "/data/tfds" and built[1].templates == [
      "this is a photo of a {}"]
