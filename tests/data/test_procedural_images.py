"""Procedural warm-start images: deterministic per (seed, index), varied, any size."""

import types

import numpy as np
import pytest

from dpvl.data import procedural_images
from dpvl.data import sources


def test_deterministic_and_varied():
  a = procedural_images.ProceduralImages(10**9, 32, seed=0)
  b = procedural_images.ProceduralImages(10**9, 32, seed=0)
  c = procedural_images.ProceduralImages(10**9, 32, seed=1)
  np.testing.assert_array_equal(a[123_456_789]["image"], b[123_456_789]["image"])
  assert not np.array_equal(a[5]["image"], c[5]["image"])
  images = np.stack([a[i]["image"] for i in range(64)]).astype(np.float32)
  assert images.shape == (64, 32, 32, 3) and images.dtype == np.float32
  # Varied: images differ from each other, and each has structure (not a flat colour).
  assert np.mean(images.std(axis=(1, 2, 3)) > 10) > 0.9
  means = images.mean(axis=(1, 2))
  assert means.std(axis=0).min() > 10
  with pytest.raises(IndexError):
    procedural_images.ProceduralImages(10, 8)[10]


def test_registered_as_a_source():
  src = sources.build_source(types.SimpleNamespace(source="procedural", size=7, image_size=16,
                                                   seed=3))
  assert len(src) == 7 and src[6]["image"].shape == (16, 16, 3)
