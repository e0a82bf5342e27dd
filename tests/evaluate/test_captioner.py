"""The captioner's evaluators: losses equal to training's, the argmin of planted losses (zero-shot
with averaged templates, ARO-style order with bad items), and real runs of a random captioner
through the registry, including greedy caption samples as an artifact."""

import copy
import json

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import evals as eval_configs
from dpvl import config as config_lib
from dpvl import evaluate
from dpvl.data import shape_scenes
from dpvl.data import sources
from dpvl.data import tokenizers
from dpvl.data import transforms
from dpvl.evaluate import captioner
from dpvl.objectives import build_objective
from tests import configs_for_tests


@pytest.fixture(scope="module")
def model():
  """(config, objective, params) of the small DP-Cap config's captioner, random init."""
  config = configs_for_tests.small_dpcap_config()
  objective = build_objective(config)
  return config, objective, jax.jit(objective.init)(jax.random.key(0))


def _evaluator(config, objective, **evals):
  config = copy.deepcopy(config)
  config.evals = ml_collections.ConfigDict(evals)
  (evaluator,) = evaluate.build_evaluators(config, objective)
  return evaluator


def test_scores_are_the_training_loss_in_padded_chunks(model):
  config, objective, params = model
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  scenes = shape_scenes.ShapeScenes(5, image_size=16, seed=3)
  images = np.stack([scenes[i]["image"] for i in range(5)])  # uint8: normalised by the scorer
  tokens = np.stack([[tokenizer.encode(scenes[(i + j) % 5]["caption"]) for j in range(3)]
                     for i in range(5)])
  loss = lambda image, t: objective.per_example_loss(params, dict(image=image, tokens=t), None)
  expected = jax.jit(jax.vmap(jax.vmap(loss, (None, 0)), (0, 0)))(
      np.stack([transforms.normalize_image(im) for im in images]), tokens)
  for batch_size in (6, 2):  # 2 images x 3 captions; 1 image x 2 captions (captions split)
    got = captioner.caption_scorer(objective, tokenizer, batch_size)(params, images, tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_top_k_and_order_accuracy():
  losses = np.array([[0.1, 0.5, 0.3], [0.2, 0.1, 0.3], [0.3, 0.3, 0.1]])
  assert captioner.top_k_accuracy(losses, np.array([0, 0, 1]), 1) == pytest.approx(1 / 3)
  assert captioner.top_k_accuracy(losses, np.array([0, 0, 1]), 2) == pytest.approx(2 / 3)
  with_absent = np.where(np.eye(3, dtype=bool)[::-1], np.inf, losses)
  # Row 2's captions 0 and 1 tie: a tie is not a win.
  assert captioner.order_accuracy(losses, np.array([0, 1, 0])) == pytest.approx(2 / 3)
  assert captioner.order_accuracy(with_absent, np.array([0, 0, 2])) == 1.0
  np.testing.assert_array_equal(
      captioner.class_losses(np.array([[1.0, 3.0, 0.0, 5.0]]), 2), [[2.0, 2.5]])


# -- planted losses: a stub scorer that knows the answer ------------------------------------

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]  # 7 classes: top-5 is reported


def _stub_scorer(loss_of, tokenizer_config):
  """A `caption_scorer` stand-in: loss_of(image class, caption text) for every pair, the
  image class read off its constant pixel value (30 * class)."""
  tokenizer = tokenizers.build_tokenizer(tokenizer_config)

  def factory(objective, tok, batch_size=512, desc=""):
    del objective, tok, batch_size, desc

    def score(params, images, tokens):
      del params
      classes = np.rint(images.mean(axis=(1, 2, 3)) / 30).astype(int)  # uint8, as loaded
      return np.array([[loss_of(c, tokenizer.decode(t)) for t in row]
                       for c, row in zip(classes, tokens)])

    return score

  return factory


def _coloured_records(labels):
  return [dict(image=np.full((16, 16, 3), 30 * y, np.uint8), label=int(y)) for y in labels]


@pytest.mark.parametrize("offset, top1, top5", [(0, 1.0, 1.0), (2, 0.0, 1.0), (5, 0.0, 0.0)])
def test_zero_shot_predicts_the_class_of_lowest_mean_loss(model, monkeypatch, offset, top1,
                                                          top5):
  config, objective, _ = model
  labels = np.arange(14) % 7
  monkeypatch.setattr(sources, "build_source", lambda cfg: _coloured_records(labels))

  def loss_of(true, text):
    """(class - true + offset) mod 7: the true class ranks offset + 1; template-dependent
    terms that cancel in the mean over templates."""
    c = next(i for i, n in enumerate(NAMES) if text.endswith(n))
    swing = 10.0 if c == (true + 1) % 7 else 0.0
    return (c - true + offset) % 7 + (swing if text.startswith("one") else -swing)

  monkeypatch.setattr(captioner, "caption_scorer", _stub_scorer(loss_of, config.tokenizer))
  evaluator = _evaluator(config, objective, zs=dict(
      type="caption_zero_shot", class_names=NAMES, templates=["one {}", "two {}"], size=14,
      data=dict(source="stub")))
  assert evaluator(None) == {"zs/top1": top1, "zs/top5": top5, "zs/chance": 1 / 7,
                             "zs/skipped": 0}


def _png(path, value):
  Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)
  return str(path)


def _order_file(tmp_path):
  """Five good items (the caption starting "yes" is the true one in four), five bad ones."""
  (tmp_path / "img").mkdir()
  _png(tmp_path / "img" / "a.png", 10)
  absolute = _png(tmp_path / "b.png", 200)
  (tmp_path / "broken.png").write_bytes(b"not a png")
  items = [
      dict(image="img/a.png", captions=["yes a dog", "no dog a"], label=0),
      dict(image=absolute, captions=["no x", "no y", "yes z"], label=2),
      dict(image="img/a.png", captions=["no", "yes", "no", "no", "no"], label=1),
      dict(image="img/a.png", captions=["no", "yes"], label=1, box=[2, 2, 10, 12]),
      dict(image="img/a.png", captions=["yes", "no"], label=1),  # the planted loss is wrong
      dict(image="img/missing.png", captions=["yes", "no"], label=0),
      dict(image="broken.png", captions=["yes", "no"], label=0),
      dict(image="img/a.png", captions=["yes", "no"], label=2),
      dict(image="img/a.png", captions=["yes"], label=0),
      ["not", "an", "item"],
  ]
  path = tmp_path / "order.json"
  path.write_text(json.dumps(items))
  return str(path)


SKIPPED = {"skipped/missing_image": 1, "skipped/corrupt_image": 1, "skipped/bad_label": 1,
           "skipped/bad_captions": 1, "skipped/bad_item": 1}


def test_order_counts_the_true_caption_of_lowest_loss_and_skips_bad_items(model, tmp_path,
                                                                          monkeypatch):
  config, objective, _ = model
  loss_of = lambda _, text: 0.0 if text.startswith("yes") else 1.0
  monkeypatch.setattr(captioner, "caption_scorer", _stub_scorer(loss_of, config.tokenizer))
  evaluator = _evaluator(config, objective, aro=eval_configs.caption_order(_order_file(tmp_path)))
  expected = dict(top1=0.8, chance=(1 / 2 + 1 / 3 + 1 / 5 + 1 / 2 + 1 / 2) / 5, items=5,
                  skipped=5, **SKIPPED)
  assert evaluator(None) == pytest.approx({f"aro/{k}": v for k, v in expected.items()})


def test_order_refuses_a_file_without_usable_items(model, tmp_path):
  config, objective, _ = model
  (tmp_path / "bad.json").write_text(json.dumps([dict(image="none.png", captions=["a", "b"],
                                                      label=0)]))
  for path, message in [(tmp_path / "bad.json", "no usable item"),
                        (tmp_path / "absent.json", "not a readable JSON file")]:
    with pytest.raises(config_lib.ConfigError, match=f"config.evals.aro.path: .*{message}"):
      _evaluator(config, objective, aro=eval_configs.caption_order(str(path)))


@pytest.mark.parametrize("kind", ["caption_zero_shot", "caption_order", "caption_samples"])
def test_other_objectives_are_refused(dpclip_config, kind):
  config = dpclip_config()
  with pytest.raises(config_lib.ConfigError, match="config.objective='dpcap', not 'dpclip'"):
    _evaluator(config, build_objective(config), e=dict(type=kind))


# -- real runs of the random captioner --------------------------------------------------------


def test_zero_shot_and_order_with_the_real_captioner(model, tmp_path):
  config, objective, params = model
  zs = _evaluator(config, objective,
                  zs=eval_configs.scene_caption_zero_shot("colour", size=30, image_size=16))
  metrics = zs(params)
  assert set(metrics) == {"zs/top1", "zs/top5", "zs/chance", "zs/skipped"}
  assert metrics["zs/chance"] == pytest.approx(1 / 7) and metrics["zs/skipped"] == 0
  assert 0.0 <= metrics["zs/top1"] <= metrics["zs/top5"] <= 1.0
  assert metrics["zs/top1"] < 0.6  # random init: near chance (at most one class's share)
  aro = _evaluator(config, objective, aro=eval_configs.caption_order(_order_file(tmp_path)))
  metrics = aro(params)
  assert metrics["aro/items"] == 5 and metrics["aro/skipped"] == 5
  assert metrics["aro/top1"] in {0.0, 0.2, 0.4, 0.6, 0.8, 1.0}


def test_caption_samples_are_an_artifact(model, tmp_path):
  config, objective, params = model
  samples = eval_configs.scene_caption_samples(count=3, image_size=16)
  samples.max_len = 8
  evaluator = _evaluator(config, objective, samples=samples)
  row = dict(step=4, **evaluator(params))
  scalars, artifacts = evaluate.split_outputs(row)
  assert scalars == {"step": 4, "samples/skipped": 0}
  captions = artifacts["samples/captions"]
  scenes = shape_scenes.ShapeScenes(3, image_size=16, seed=1_000_003)
  assert [c["reference"] for c in captions] == [scenes[i]["caption"] for i in range(3)]
  assert all(isinstance(c["caption"], str) and len(c["caption"]) <= 7
             for c in captions)  # 8 tokens: BOS and 7 bytes at most
  path = evaluate.write_artifacts(str(tmp_path), 4, artifacts)
  with open(path) as f:
    assert json.load(f) == {"step": 4, "samples/captions": captions}
