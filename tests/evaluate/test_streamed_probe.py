"""The streamed linear probe: features streamed to a file on disk, a non-affine BatchNorm +
linear head trained by LARS from it; its per-host split and cross-host sums; its config."""

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import evals as eval_configs
from configs import vip_tiny
from dpvl import config as config_lib
from dpvl import evaluate
from dpvl.data import transforms
from dpvl.evaluate import streamed_probe as sp
from dpvl.objectives import build_objective

NUM_CLASSES = 10
DIM = 4 * 4 * 3


class Planted:
  """Labelled 4 x 4 images: a class's fixed pattern plus noise; records in `bad` have no
  image, records in `wrong` a float image (both unusable)."""

  def __init__(self, n, seed, bad=(), wrong=()):
    self.n, self.seed, self.bad, self.wrong = n, seed, set(bad), set(wrong)
    self.centres = np.random.default_rng(0).integers(40, 216, (NUM_CLASSES, 4, 4, 3))
    self.reads = []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads.append(i)
    rng = np.random.default_rng([self.seed, i])
    y = int(rng.integers(NUM_CLASSES))
    image = np.clip(self.centres[y] + rng.normal(0, 40, (4, 4, 3)), 0, 255).astype(np.uint8)
    if i in self.bad:
      return dict(label=y)
    return dict(image=image.astype(np.float32) if i in self.wrong else image, label=y)


@dataclasses.dataclass
class Flat:
  """An objective whose encoder is the identity on the flattened normalised image."""

  image_size: int = 4

  def encode(self, params, x):
    tokens = x.reshape(x.shape[0], 1, -1) * params["scale"]
    return tokens, [tokens]

  def normalize(self, images):
    return transforms.normalize_image(images)


PARAMS = {"scale": jnp.ones(())}


def _setup(train, test, tmp_path=None, **head):
  head = dict(dict(epochs=8, warmup_epochs=1, batch_size=128, base_learning_rate=10.0), **head)
  return sp.ProbeSetup(
      train_source=train, test_source=test, train_size=len(train), test_size=len(test),
      num_classes=NUM_CLASSES, image_size=4, label_key="label", crop_fraction=1.0,
      encode_batch=64, workers=4, feature_dtype="float16",
      feature_cache_dir=None if tmp_path is None else str(tmp_path),
      keep_features=tmp_path is not None, head=sp.HeadOptions(**head))


def test_probe_on_planted_signal_streams_features_through_files(tmp_path):
  train, test = Planted(1500, 1, bad={3, 700}, wrong={9}), Planted(400, 2, bad={5})
  out = sp.run_probe(_setup(train, test, tmp_path), sp.feature_encoder(Flat(), 0), PARAMS,
                     Flat().normalize)
  assert out["top1"] > 0.95 and out["top5"] >= out["top1"]
  assert out["train_examples"] == 1497 and out["test_examples"] == 399
  assert (out["skipped"], out["skipped/train"], out["skipped/test"]) == (4, 3, 1)
  assert out["skipped/KeyError"] == 3 and out["skipped/ValueError"] == 1
  # The features went to disk, n x d x itemsize bytes each (float16), in a scratch directory.
  (directory,) = glob.glob(str(tmp_path / "dpvl-probe-*"))
  sizes = {os.path.basename(p): os.path.getsize(p) for p in glob.glob(directory + "/*.float16")}
  assert sizes == {"train-host0.float16": 1497 * DIM * 2, "test-host0.float16": 399 * DIM * 2}


def test_scratch_directory_is_removed_unless_kept(tmp_path):
  setup = dataclasses.replace(_setup(Planted(300, 1), Planted(100, 2), tmp_path, epochs=1),
                              keep_features=False)
  sp.run_probe(setup, sp.feature_encoder(Flat(), 0), PARAMS, Flat().normalize)
  assert os.listdir(tmp_path) == []


def test_records_are_streamed_in_chunks():
  source = Planted(1000, 1, bad={2})
  read = lambda i: sp.read_example(source, i, 4, "label", Flat().normalize)
  chunks = sp.stream_examples(read, 100, 400, chunk=64, workers=4)
  images, labels, skipped = next(chunks)
  # At most the chunk in hand and the next one have been read.
  assert len(source.reads) <= 128 and max(source.reads) < 100 + 128
  assert images.shape == (64, 4, 4, 3) and images.dtype == np.float32 and skipped == {}
  rest = list(chunks)
  assert [len(l) for _, l, _ in rest] == [64, 64, 64, 44]
  assert sorted(source.reads) == list(range(100, 400))
  head = sp.stream_examples(read, 0, 64, chunk=64, workers=2)
  assert next(head)[2] == {"KeyError": 1} and len(source.reads) == 300 + 64


def test_extract_writes_a_memory_mapped_file_with_the_features_moments(tmp_path):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 10).astype(np.float32)
  y = rng.integers(3, size=300).astype(np.int32)
  chunks = [(x[i:i + 64], y[i:i + 64], {}) for i in range(0, 300, 64)]
  identity = jax.jit(lambda params, v: v)
  split = sp.extract(identity, None, chunks, str(tmp_path / "f"), 320, 6, "float16", 64, 3)
  assert isinstance(split.features, np.memmap) and split.features.shape == (300, 6)
  assert os.path.getsize(tmp_path / "f") == 300 * 6 * 2
  stored = np.asarray(split.features, np.float64)
  np.testing.assert_array_equal(stored, x.astype(np.float16))
  np.testing.assert_array_equal(split.labels, y)
  # The BatchNorm's statistics are those of the stored training features.
  assert split.moments.count == 300
  np.testing.assert_allclose(split.moments.mean, stored.mean(0), rtol=1e-12)
  np.testing.assert_allclose(split.moments.var, stored.var(0), rtol=1e-9)
  with pytest.raises(sp.ProbeDataError, match=r"label 3 is outside \[0, 3\)"):
    sp.extract(identity, None, [(x[:4], np.array([0, 1, 2, 3]), {})], str(tmp_path / "g"),
               4, 6, "float16", 4, 3)
  with pytest.raises(sp.ProbeDataError, match="feature_dtype='float32'"):
    sp.extract(identity, None, [(np.full((4, 6), 1e6, np.float32), y[:4], {})],
               str(tmp_path / "h"), 4, 6, "float16", 4, 3)


def test_non_affine_batchnorm_standardises_with_the_given_statistics():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 5.0, size=(500, 8))
  n, mean, var = sp.moments(x)
  head = dict(w=jnp.eye(8), b=jnp.zeros(8))
  z = np.asarray(sp.head_logits(head, x, mean, var, 1e-6))
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(z.var(0), 1, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_lars_and_sgd_decrease_the_loss(optimizer):
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(NUM_CLASSES, 16)) * 2
  y = rng.integers(NUM_CLASSES, size=1024).astype(np.int32)
  x = (centres[y] + rng.normal(size=(1024, 16)) + 5).astype(np.float16)
  stats = sp.RunningMoments(16)
  stats.add(x)
  # LARS at MAE's peak rate (6.4): the trust ratio scales the weights' steps to ~0.6% of
  # their norm, so it needs more steps than SGD.
  options = sp.HeadOptions(epochs=12 if optimizer == "lars" else 6, warmup_epochs=2,
                           batch_size=64, optimizer=optimizer,
                           base_learning_rate=25.0 if optimizer == "lars" else 0.4)
  head, losses = sp.train_head(sp.Split(x, y, {}, stats), stats.mean, stats.var, NUM_CLASSES,
                               options)
  assert losses[-1] < 0.5 * losses[0] and losses[0] < np.log(NUM_CLASSES) + 0.1
  assert head["w"].shape == (16, NUM_CLASSES) and isinstance(head["w"], np.ndarray)


def test_optimizer_follows_the_mae_schedule():
  options = sp.HeadOptions()  # MAE's linear probing: blr 0.1, batch 16384 -> lr 6.4
  assert options.learning_rate == pytest.approx(6.4)
  assert (options.optimizer, options.momentum, options.weight_decay) == ("lars", 0.9, 0.0)
  assert (options.epochs, options.warmup_epochs, options.bn_eps) == (90, 10, 1e-6)
  # Warm-up then cosine: one step of a 1-D "head" with gradient 1 and no trust ratio.
  optimizer = sp.make_optimizer(dataclasses.replace(options, optimizer="sgd", momentum=0.0,
                                                    epochs=4, warmup_epochs=2), 10)
  params = dict(b=jnp.zeros(1))
  update = jax.jit(lambda state: optimizer.update(dict(b=jnp.ones(1)), state, params))
  state, rates = optimizer.init(params), []
  for _ in range(40):
    updates, state = update(state)
    rates.append(-float(updates["b"][0]))
  assert rates[0] == 0 and rates[20] == pytest.approx(6.4) and rates[10] == pytest.approx(3.2)
  assert rates[30] == pytest.approx(3.2, rel=1e-5) and rates[-1] < 0.05
  # LARS: the trust ratio scales the weight matrix's update, not the bias's.
  lars = sp.make_optimizer(dataclasses.replace(options, warmup_epochs=0), 10)
  head = dict(w=jnp.full((2, 2), 0.5), b=jnp.zeros(2))
  updates, _ = jax.jit(lars.update)(dict(w=jnp.full((2, 2), 2.0), b=jnp.ones(2)),
                                    lars.init(head), head)
  np.testing.assert_allclose(-updates["w"], 6.4 * 1e-3 * 1.0 / 4.0 * 2.0, rtol=1e-5)
  np.testing.assert_allclose(-updates["b"], 6.4, rtol=1e-5)


# -- several hosts, simulated ---------------------------------------------------------------


def test_host_shares_cover_the_split():
  for n, hosts in [(10, 3), (1_281_167, 64), (5, 8)]:
    shares = [sp.host_share(n, h, hosts) for h in range(hosts)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [b - a for a, b in shares]
    assert max(sizes) - min(sizes) <= 1
  with pytest.raises(ValueError):
    sp.host_share(10, 3, 3)


def test_per_host_features_and_sums_equal_one_host(tmp_path):
  source = Planted(203, 1, bad={7, 150})
  read = lambda i: sp.read_example(source, i, 4, "label", Flat().normalize)
  encode = sp.feature_encoder(Flat(), 0)

  def features(start, stop, path):
    return sp.extract(encode, PARAMS, sp.stream_examples(read, start, stop, 32), path,
                      stop - start, DIM, "float32", 32, NUM_CLASSES)

  whole = features(0, 203, str(tmp_path / "whole"))
  parts = [features(*sp.host_share(203, h, 3), str(tmp_path / f"host{h}")) for h in range(3)]
  np.testing.assert_array_equal(np.concatenate([p.features for p in parts]), whole.features)
  np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), whole.labels)
  # What the hosts gather: moments, counts, skips.
  n, mean, var = sp.combine_moments([p.moments.count for p in parts],
                                    [p.moments.mean for p in parts],
                                    [p.moments.var for p in parts])
  assert n == 201
  # As process_allgather stacks the hosts' one-element count arrays: [hosts, 1].
  gathered = sp.combine_moments(np.stack([[p.moments.count] for p in parts]),
                                np.stack([p.moments.mean for p in parts]),
                                np.stack([p.moments.var for p in parts]))
  assert gathered[0] == n and gathered[1].shape == mean.shape
  np.testing.assert_allclose(gathered[1], mean)
  np.testing.assert_allclose(mean, np.mean(whole.features, 0, dtype=np.float64), atol=1e-6)
  np.testing.assert_allclose(var, np.var(np.asarray(whole.features, np.float64), 0), atol=1e-6)
  head = dict(w=jnp.asarray(np.random.default_rng(0).normal(size=(DIM, NUM_CLASSES))),
              b=jnp.zeros(NUM_CLASSES))
  counts = [sp.topk_counts(head, p, mean, var, 1e-6, (1, 5), chunk=16) for p in parts]
  np.testing.assert_array_equal(sp.sum_counts(np.stack(counts)),
                                sp.topk_counts(head, whole, mean, var, 1e-6, (1, 5)))
  skips = sp.merge_skips([dict(train=p.skipped, test={}) for p in parts])
  assert skips == dict(train={"KeyError": 2}, test={})


def test_global_batch_gradient_is_the_mean_of_equal_host_batches():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(64, 5)), rng.integers(3, size=64)
  head = dict(w=jnp.asarray(rng.normal(size=(5, 3))), b=jnp.zeros(3))
  grad = jax.jit(lambda xs, ys: jax.grad(sp.head_loss)(head, xs, ys, 0.0, 1.0, 1e-6))
  halves = [grad(x[h::2], y[h::2]) for h in range(2)]
  np.testing.assert_allclose(grad(x, y)["w"], (halves[0]["w"] + halves[1]["w"]) / 2, rtol=1e-5)


def test_epoch_batches_and_steps_per_host():
  assert sp.steps_per_epoch([1000, 999, 1001], 300) == 9  # 100 rows per host and step
  b = sp.epoch_batches(999, 100, 9, seed=0, epoch=0, host=1)
  assert b.shape == (9, 100) and len(np.unique(b)) == 900 and b.max() < 999
  assert np.all(np.diff(b, axis=1) > 0)  # sorted within a batch
  assert not np.array_equal(b, sp.epoch_batches(999, 100, 9, seed=0, epoch=1, host=1))
  assert not np.array_equal(b, sp.epoch_batches(999, 100, 9, seed=0, epoch=0, host=0))
  np.testing.assert_array_equal(b, sp.epoch_batches(999, 100, 9, seed=0, epoch=0, host=1))


# -- the evaluator and its config ------------------------------------------------------------


def _scene_probe(**fields):
  data = lambda seed: dict(source="shape_scenes", size=300, image_size=32, seed=seed,
                           max_objects=1)
  probe = dict(type="streamed_linear_probe", blocks=1, label_key="colour_label",
               num_classes=7, epochs=20, warmup_epochs=2, batch_size=50, encode_batch=64,
               workers=2, base_learning_rate=0.5, optimizer="sgd", data=data(11),
               test_data=data(12), test_size=200)
  return ml_collections.ConfigDict(dict(probe, **fields))


def _vip_config(**fields):
  config = vip_tiny.get_config()
  config.evals = ml_collections.ConfigDict(dict(probe=_scene_probe(**fields)))
  return config


def test_evaluator_reads_a_vit_encoder():
  # Colour is linear in the pixels: an untrained encoder's features carry it (chance 1/7).
  config = _vip_config()
  objective = build_objective(config)
  (evaluator,) = evaluate.build_evaluators(config, objective)
  metrics = evaluator(jax.jit(objective.init)(jax.random.key(0)))
  assert metrics["probe/top1"] > 0.6, metrics
  assert metrics["probe/train_examples"] == 300 and metrics["probe/test_examples"] == 200
  assert metrics["probe/skipped"] == 0 and 0 <= metrics["probe/top5"] <= 1


@pytest.mark.parametrize("field, value, message", [
    ("blocks", 5, "config.evals.probe.blocks"),
    ("epochs", 0, "config.evals.probe.epochs must be >= 1"),
    ("warmup_epochs", 30, r"config.evals.probe.warmup_epochs=30 must be in \[0, epochs=20\]"),
    ("optimizer", "adamw", "config.evals.probe.optimizer must be one of"),
    ("feature_dtype", "int8", "config.evals.probe.feature_dtype must be one of"),
    ("batch_size", 400, "config.evals.probe.batch_size=400 exceeds the 300 training records"),
    ("train_size", 301, r"config.evals.probe.train_size=301 must be in \[1, 300\]"),
    ("crop_fraction", 0.0, "config.evals.probe.crop_fraction"),
    ("num_classes", 0, "config.evals.probe.num_classes must be >= 2"),
    ("test_data", None, "config.evals.probe.test_data"),
    ("data.source", "imagenet", "config.evals.probe.data"),
    ("momentum", 1.0, "momentum in \\[0, 1\\)"),
])
def test_bad_configs_name_the_field(field, value, message):
  config = _vip_config()
  if value is None:
    del config.evals.probe[field]
  else:
    node = config.evals.probe.data if "." in field else config.evals.probe
    node[field.split(".")[-1]] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    evaluate.build_evaluators(config, build_objective(config))


def test_out_of_range_labels_are_a_config_error():
  config = _vip_config(num_classes=3, epochs=1, warmup_epochs=0)
  objective = build_objective(config)
  (evaluator,) = evaluate.build_evaluators(config, objective)
  with pytest.raises(config_lib.ConfigError, match=r"config.evals.probe: label \d is outside"):
    evaluator(jax.jit(objective.init)(jax.random.key(0)))


def test_imagenet_builder_is_the_papers_protocol():
  c = eval_configs.imagenet_linear_probe(12, data_dir="/data/tfds")
  assert c.type == "streamed_linear_probe" and c.blocks == 12 and c.num_classes == 1000
  assert c.type in evaluate.REGISTRY
  assert (c.data.split, c.test_data.split, c.data.image_size) == ("train", "validation", 256)
  assert c.data.data_dir == "/data/tfds" and c.feature_cache_dir is None
  options = sp.head_options(ml_collections.ConfigDict(dict(evals=dict(p=c))), "p")
  assert options == sp.HeadOptions()
  assert options.learning_rate == pytest.approx(6.4)
  c.feature_cache_dir = "/scratch"  # a string field, settable from the command line
  assert c.feature_cache_dir == "/scratch"
  assert isinstance(optax.lars(0.1), optax.GradientTransformation)
