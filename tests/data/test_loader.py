"""The batch loader: padding, skipping bad records by reason, worker processes, host shares."""

import types

import numpy as np

from dpvl.data import loader
from dpvl.privacy import sampling


class _FlakySource:
  """Record 3 cannot be read; record 5 has a caption the objective rejects."""

  def __len__(self):
    return 10

  def __getitem__(self, i):
    if i == 3:
      raise OSError("truncated file")
    return dict(value=np.float32(i), caption=None if i == 5 else "ok")


def _prepare(record):
  if record["caption"] is None:
    raise ValueError("empty caption")
  return dict(x=np.full(2, record["value"], np.float32))


def test_loader_pads_and_skips_bad_records_by_reason():
  import jax
  spec = dict(x=jax.ShapeDtypeStruct((2,), np.float32))
  batch_loader = loader.BatchLoader(_FlakySource(), _prepare, spec, num_microbatches=2,
                                    microbatch_size=4)
  # The loader reads only `indices` and `mask` of a selection (`loader.Selection`).
  selection = types.SimpleNamespace(indices=np.array([1, 3, 5, 7, 9, 0, 0, 0]),
                                    mask=np.array([1, 1, 1, 1, 1, 0, 0, 0], bool))
  batch = batch_loader.load(selection)
  np.testing.assert_array_equal(selection.mask, [1, 1, 1, 1, 1, 0, 0, 0])  # left as it was
  assert batch.mask.shape == (2, 4) and batch.examples["x"].shape == (2, 4, 2)
  np.testing.assert_array_equal(batch.mask.ravel(), [1, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch.examples["x"][..., 0].ravel(), [1, 0, 0, 7, 9, 0, 0, 0])
  assert sum(batch.skipped.values()) == 2
  assert batch.skipped == {"unreadable_record": 1, "bad_record": 1}


def test_loader_worker_processes_give_the_same_batch():
  import jax
  spec = dict(x=jax.ShapeDtypeStruct((2,), np.float32))
  selection = sampling.Selection(indices=np.array([1, 3, 5, 7, 9, 2, 0, 0]),
                                 mask=np.array([1, 1, 1, 1, 1, 1, 0, 0], bool),
                                 poisson_size=6, truncated=0)
  threads = loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4)
  processes = loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4, processes=2)
  a, b = threads.load(selection), processes.load(selection)
  processes.close()
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.examples["x"], b.examples["x"])
  assert a.skipped == b.skipped == {"unreadable_record": 1, "bad_record": 1}


def test_each_host_loads_only_its_share_of_the_batch():
  import jax
  spec = dict(x=jax.ShapeDtypeStruct((2,), np.float32))
  selection = sampling.PoissonSampler(10, 0.5, capacity=8, seed=4).select(0)
  full = loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4).load(selection)
  shares = [loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4, host=h,
                               num_hosts=2).load(selection) for h in range(2)]
  assert all(s.mask.shape == (2, 2) and s.examples["x"].shape == (2, 2, 2) for s in shares)
  # The hosts' rows side by side are the global batch (micro-batch axis sharded over hosts).
  np.testing.assert_array_equal(np.concatenate([s.mask for s in shares], 1), full.mask)
  np.testing.assert_array_equal(np.concatenate([s.examples["x"] for s in shares], 1),
                                full.examples["x"])
  assert shares[0].skipped + shares[1].skipped == full.skipped


class _ImageSource:
  """Record i: a 40 x 48 image of random pixels seeded by i."""

  def __len__(self):
    return 10

  def __getitem__(self, i):
    return dict(image=np.random.default_rng(i).integers(0, 256, (40, 48, 3), np.uint8))


def test_images_are_drawn_afresh_per_step_from_the_record_alone():
  import jax
  spec = dict(image=jax.ShapeDtypeStruct((16, 16, 3), np.uint8))
  prepare = lambda record: dict(image=record["image"])
  augment = loader.augmentation(dict(crop="random_resized", seed=5), 16)
  assert augment.scale == (0.2, 1.0) and augment.flip
  assert loader.augmentation(dict(crop="center"), 16) is None
  make = lambda **kw: loader.BatchLoader(_ImageSource(), prepare, spec, 2, 2, augment=augment,
                                         **kw)
  one = types.SimpleNamespace(indices=np.array([4, 7, 1, 0]), mask=np.array([1, 1, 1, 0], bool))
  other = types.SimpleNamespace(indices=np.array([7, 2, 9, 3]), mask=np.array([1, 1, 1, 1], bool))
  threads, processes = make(), make(processes=2)
  step3 = threads.load(one, step=3).examples["image"].reshape(4, 16, 16, 3)
  np.testing.assert_array_equal(step3, threads.load(one, step=3).examples["image"].reshape(
      4, 16, 16, 3))  # a replayed step reads the same pixels
  np.testing.assert_array_equal(step3, processes.load(one, step=3).examples["image"].reshape(
      4, 16, 16, 3))
  processes.close()
  step4 = threads.load(one, step=4).examples["image"].reshape(4, 16, 16, 3)
  assert all(not np.array_equal(step3[i], step4[i]) for i in range(3))  # fresh each step
  # Record 7's draw at step 3 is the same whatever else is in the batch, and where it sits.
  beside_others = threads.load(other, step=3).examples["image"].reshape(4, 16, 16, 3)
  np.testing.assert_array_equal(step3[1], beside_others[0])
  np.testing.assert_array_equal(step3[1], augment(_ImageSource()[7]["image"], 7, 3))


def test_augmentation_config_errors_are_config_errors():
  import pytest

  from dpvl import config as config_lib
  with pytest.raises(config_lib.ConfigError, match="crop_scale"):
    loader.augmentation(dict(crop="random_resized", crop_scale=(0.5, 0.2)), 16)
