"""Image decoding, crops and normalisation; caption cleaning and the bad captions it names."""

import numpy as np
import pytest

from dpvl.data import errors
from dpvl.data import records
from dpvl.data import transforms
from tests.data import webdata


def test_normalisation_is_fixed():
  image = np.array([[[0, 255, 127]]], np.uint8)
  out = transforms.normalize_image(image)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[-1.0, 1.0, 127 / 127.5 - 1]]], rtol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    transforms.normalize_image(image.astype(np.float32))
  with pytest.raises(ValueError, match="shape"):
    transforms.normalize_image(np.zeros((4, 4), np.uint8))


def test_decode_jpeg_and_png_and_name_corrupt_images():
  png = transforms.decode_image(webdata.jpeg(3, fmt="PNG"))
  jpg = transforms.decode_image(webdata.jpeg(3))
  assert png.shape == jpg.shape == (24, 30, 3) and png.dtype == jpg.dtype == np.uint8
  assert np.abs(png.astype(int) - jpg.astype(int)).mean() < 8  # same picture, lossy JPEG
  small = transforms.decode_image(webdata.jpeg(3, 200, 300), min_size=16)
  assert min(small.shape[:2]) >= 16 and small.shape[0] < 200  # decoded at a DCT scale
  for data in (b"", b"\xff\xd8 garbage", webdata.jpeg(3)[:150], webdata.jpeg(3, fmt="PNG")[:100]):
    with pytest.raises(errors.BadRecord) as info:
      transforms.decode_image(data)
    assert info.value.reason == "corrupt_image"


def test_random_resized_crop_is_seeded_per_record():
  image = transforms.decode_image(webdata.jpeg(5, 60, 80))
  crop = lambda seed, index: transforms.random_resized_crop(
      image, 16, np.random.default_rng([seed, index]))
  assert crop(0, 1).shape == (16, 16, 3) and crop(0, 1).dtype == np.uint8
  np.testing.assert_array_equal(crop(0, 1), crop(0, 1))
  assert not np.array_equal(crop(0, 1), crop(0, 2))
  assert not np.array_equal(crop(0, 1), crop(1, 1))
  parts = dict(jpg=webdata.jpeg(5, 60, 80), txt=b"x")
  a = records.decode(parts, 7, 16, "random_resized", seed=3)["image"]
  np.testing.assert_array_equal(a, records.decode(parts, 7, 16, "random_resized", 3)["image"])
  centre = records.decode(parts, 7, 16)["image"]
  np.testing.assert_array_equal(centre, transforms.resize_center_crop(
      transforms.decode_image(parts["jpg"], min_size=16), 16))
  with pytest.raises(ValueError, match="crop"):
    records.decode(parts, 7, 16, "zoom")


@pytest.mark.parametrize("raw, clean", [
    (b"  A  cat\n on a\tmat ", "A cat on a mat"), ("caf\u0065\u0301", "caf\u00e9"),
    (b"\xef\xbb\xbfbom\x00 and\x07 bell", "bom and bell"), ("日本の 猫", "日本の 猫")])
def test_caption_cleaning(raw, clean):
  assert transforms.clean_caption(raw) == clean


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty_caption"), (" \n\t\x00", "empty_caption"), (None, "empty_caption"),
    (b"caf\xe9", "non_utf8_caption"), (b"\xff\xfe", "non_utf8_caption")])
def test_bad_captions_are_named(raw, reason):
  with pytest.raises(errors.BadRecord) as info:
    transforms.clean_caption(raw)
  assert info.value.reason == reason
