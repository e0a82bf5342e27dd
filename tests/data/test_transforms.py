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
  imagenet = transforms.normalize_image(image, "imagenet")  # torchvision's ImageNet statistics
  np.testing.assert_allclose(imagenet, [[[-0.485 / 0.229, (1 - 0.456) / 0.224,
                                          (127 / 255 - 0.406) / 0.225]]], rtol=1e-6)
  with pytest.raises(ValueError, match="normalization"):
    transforms.normalize_image(image, "cifar")
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


def test_augmentation_is_fresh_per_draw_and_a_function_of_seed_record_step():
  image = transforms.decode_image(webdata.jpeg(5, 60, 80))
  augment = transforms.Augmentation(16, seed=3)
  draw = lambda index, step, aug=augment: aug(image, index, step)
  assert draw(1, 0).shape == (16, 16, 3) and draw(1, 0).dtype == np.uint8
  np.testing.assert_array_equal(draw(1, 0), draw(1, 0))  # a replayed step: the same pixels
  assert not np.array_equal(draw(1, 0), draw(1, 1))  # a new step: a new crop
  assert not np.array_equal(draw(1, 0), draw(2, 0))
  assert not np.array_equal(draw(1, 0), draw(1, 0, transforms.Augmentation(16, seed=4)))
  with pytest.raises(ValueError, match="crop_scale"):
    transforms.Augmentation(16, scale=(0.0, 1.0))


def _coordinates(size: int) -> np.ndarray:
  """uint8 [size, size, 3]: channel 0 holds x, channel 1 holds y."""
  y, x = np.mgrid[:size, :size]
  return np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)


def test_crop_boxes_cover_their_scale_and_half_the_draws_are_flipped():
  image = _coordinates(100)
  for seed in range(20):  # a quarter of the area, square: a 50 x 50 box, output unscaled
    box = transforms.random_resized_crop(image, 50, np.random.default_rng(seed),
                                         scale=(0.25, 0.25), ratio=(1.0, 1.0))
    x, y = box[..., 0].astype(int), box[..., 1].astype(int)
    assert (np.diff(x, axis=1) == 1).all() and (np.diff(y, axis=0) == 1).all()
    assert 0 <= x.min() and x.max() < 100 and 0 <= y.min() and y.max() < 100
  whole = transforms.Augmentation(100, seed=3, scale=(1.0, 1.0))
  flipped = [whole(image, i, 0)[0, 0, 0] > whole(image, i, 0)[0, -1, 0] for i in range(400)]
  assert 0.42 < np.mean(flipped) < 0.58  # 400 fair coins: 0.5 +- 0.025


def test_records_for_random_resized_crops_keep_the_whole_image():
  parts = dict(jpg=webdata.jpeg(5, 60, 80), txt=b"x")
  whole = records.decode(parts, 7, 16, "random_resized")["image"]
  assert 16 <= min(whole.shape[:2]) <= 32 and whole.shape[1] > whole.shape[0]  # aspect kept
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
