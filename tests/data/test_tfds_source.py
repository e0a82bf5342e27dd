"""data.source="tfds" on real TensorFlow Datasets: small image datasets written here by TFDS's
own builders (ArrayRecord, in a temporary data_dir), read through dpvl's source and a linear
probe. Nothing is downloaded: every connection attempt fails the test.

Needs the [tfds] extra (pip install -e ".[dev,tfds]"); skipped without it.
"""

import io
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import vip_tiny
from dpvl import evaluate
from dpvl.data import sources
from dpvl.data import transforms
from dpvl.objectives import build_objective
from tests.helpers import data_config
from tests.helpers import raises_config_error

tfds = pytest.importorskip(
    "tensorflow_datasets",
    reason="the TFDS tests need the [tfds] extra: pip install -e '.[dev,tfds]'")

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
COLOURS = ["red", "green", "blue"]
NUM_TRAIN, NUM_TEST = 60, 24


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W, C] image (C = 1 or 3): TFDS stores them as written, so
  preparing needs no TensorFlow."""
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
  return out.getvalue()


def colour_image(i: int) -> tuple[np.ndarray, int]:
  """Example i of the colour dataset: (uint8 image, label); landscape and portrait in turn,
  noise that makes every image unique, the label's channel bright."""
  label = i % 3
  shape = (24, 36, 3) if i % 2 else (36, 24, 3)
  image = np.random.default_rng(i).integers(0, 64, shape, dtype=np.uint8)
  image[..., label] += 160
  return image, label


def gray_image(i: int) -> np.ndarray:
  return np.random.default_rng(1_000 + i).integers(0, 256, (16, 20, 1), dtype=np.uint8)


class DpvlTestColours(tfds.core.GeneratorBasedBuilder):
  """Images whose brightest channel is the label; splits train and test."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(
        image=tfds.features.Image(shape=(None, None, 3)),
        label=tfds.features.ClassLabel(names=COLOURS))))

  def _split_generators(self, dl_manager):
    del dl_manager
    return dict(train=self._generate_examples(range(NUM_TRAIN)),
                test=self._generate_examples(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST)))

  def _generate_examples(self, ids):
    for i in ids:
      image, label = colour_image(i)
      yield i, dict(image=_png(image), label=label)


class DpvlTestGray(tfds.core.GeneratorBasedBuilder):
  """Single-channel images, label i % 4."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(
        image=tfds.features.Image(shape=(None, None, 1)),
        label=tfds.features.ClassLabel(num_classes=4))))

  def _split_generators(self, dl_manager):
    del dl_manager
    return dict(train=self._generate_examples())

  def _generate_examples(self):
    for i in range(8):
      yield i, dict(image=_png(gray_image(i)), label=i % 4)


class DpvlTestManual(tfds.core.GeneratorBasedBuilder):
  """Prepared from PNG files in the manual directory (as imagenet2012 is): `<label>_<n>.png`."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <label>_<n>.png files in manual_dir."

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(
        image=tfds.features.Image(shape=(None, None, 3)),
        label=tfds.features.ClassLabel(num_classes=2))))

  def _split_generators(self, dl_manager):
    return dict(train=self._generate_examples(dl_manager.manual_dir))

  def _generate_examples(self, manual_dir):
    for path in sorted(manual_dir.glob("*.png")):
      yield path.name, dict(image=path.read_bytes(), label=int(path.name.split("_")[0]))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any connection (GCS, a download) fails the test; TFDS's GCS access stays off."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(tfds.core.utils.gcs_utils, "_is_gcs_disabled", True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with DpvlTestColours and DpvlTestGray prepared (ArrayRecord)."""
  root = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as m:
    m.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("network access attempted"))
    for name in ("dpvl_test_colours", "dpvl_test_gray"):
      tfds.builder(name, data_dir=root, file_format="array_record").download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return root


def _source(data_dir, name="dpvl_test_colours", split="train", image_size=24, **fields):
  return sources.build_source(data_config(source="tfds", name=name, split=split,
                                          image_size=image_size, data_dir=data_dir, **fields))


def _written_ids(source, image_size):
  """The id of the written colour image each record of `source` is the centre crop of, found
  by exact pixel match (TFDS shuffles examples when it writes them)."""
  ids = []
  for index in range(len(source)):
    record = source[index]
    matches = [i for i in range(NUM_TRAIN + NUM_TEST)
               if np.array_equal(record["image"],
                                 transforms.resize_center_crop(colour_image(i)[0], image_size))]
    assert len(matches) == 1, f"record {index} matches written images {matches}"
    ids.append(matches[0])
  return ids


def test_records_are_the_written_images_centre_cropped_with_their_labels(data_dir):
  source = _source(data_dir, image_size=24)  # the shorter side: a crop, no resize
  assert len(source) == NUM_TRAIN and source.num_classes == 3
  ids = _written_ids(source, 24)
  assert sorted(ids) == list(range(NUM_TRAIN))  # every example once, nothing else
  for index, i in enumerate(ids):
    record, (image, label) = source[index], colour_image(i)
    assert record["image"].dtype == np.uint8 and record["image"].shape == (24, 24, 3)
    off = (max(image.shape[:2]) - 24) // 2
    centre = image[:, off:off + 24] if i % 2 else image[off:off + 24]
    np.testing.assert_array_equal(record["image"], centre)
    assert record["label"] == label and record["index"] == index
  # A smaller size: shorter side resized to it, then the centre crop (dpvl's transform).
  small = _source(data_dir, image_size=16)
  for index in (0, 1, 7):
    expected = transforms.resize_center_crop(colour_image(ids[index])[0], 16)
    np.testing.assert_array_equal(small[index]["image"], expected)


def test_grayscale_images_become_three_equal_channels(data_dir):
  source = _source(data_dir, name="dpvl_test_gray", image_size=16)
  assert len(source) == 8 and source.num_classes == 4
  seen = []
  for index in range(8):
    record = source[index]
    assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
    # the written 16 x 20 image's centre crop, in each channel
    (i,) = [i for i in range(8) if np.array_equal(record["image"], np.repeat(
        gray_image(i)[:, 2:18], 3, axis=-1))]
    assert record["label"] == i % 4
    seen.append(i)
  assert sorted(seen) == list(range(8))


def test_split_expressions(data_dir):
  train = _source(data_dir)
  head = _source(data_dir, split="train[:80%]")
  assert len(head) == NUM_TRAIN * 8 // 10
  for index in (0, 5, len(head) - 1):  # a slice keeps the split's order
    np.testing.assert_array_equal(head[index]["image"], train[index]["image"])
  both = _source(data_dir, split="train+test")
  assert len(both) == NUM_TRAIN + NUM_TEST
  assert sorted(_written_ids(both, 24)) == list(range(NUM_TRAIN + NUM_TEST))
  assert len(_source(data_dir, split="test")) == NUM_TEST


def test_errors_name_the_field(data_dir, tmp_path):
  with raises_config_error(r"^data.name='dpvl_no_such_dataset': Dataset dpvl_no_such_dataset "
                           r"not found.$"):  # TFDS's first line only, not every name it knows
    _source(data_dir, name="dpvl_no_such_dataset")
  with raises_config_error(r"^data.split='validation' of TFDS dataset 'dpvl_test_colours' "
                           r"cannot be read: Unknown split 'validation'"):
    _source(data_dir, split="validation")
  with raises_config_error(r"data.split='train\[:200%\]'.*cannot be read"):
    _source(data_dir, split="train[:200%]")
  empty = str(tmp_path / "empty")
  with raises_config_error(rf"TFDS dataset 'dpvl_test_colours' is not prepared in "
                           rf"data_dir='{empty}'.*data.manual_dir"):
    _source(empty)
  assert not os.path.exists(os.path.join(empty, "dpvl_test_colours", "1.0.0"))


def test_prepares_from_manual_dir_without_downloading(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  images = [np.full((10, 12, 3), 40 * i, np.uint8) for i in range(6)]
  for i, image in enumerate(images):
    (manual / f"{i % 2}_{i}.png").write_bytes(_png(image))
  root = str(tmp_path / "data")
  with raises_config_error("not prepared"):
    _source(root, name="dpvl_test_manual", image_size=10)
  source = _source(root, name="dpvl_test_manual", image_size=10, manual_dir=str(manual))
  assert len(source) == 6 and source.num_classes == 2
  got = {int(source[k]["image"][0, 0, 0]) // 40: source[k]["label"] for k in range(6)}
  assert got == {i: i % 2 for i in range(6)}


def test_reading_imports_no_tensorflow(data_dir):
  """dpvl (its training and evaluation modules too) and reading a prepared dataset leave
  TensorFlow unimported."""
  code = (
      "import sys\n"
      "import dpvl, dpvl.train, dpvl.evaluate.linear_probe\n"
      "assert 'tensorflow_datasets' not in sys.modules\n"
      "from dpvl.data import sources\n"
      "from tests.helpers import data_config\n"
      f"s = sources.build_source(data_config(source='tfds', name='dpvl_test_colours', "
      f"split='train', image_size=24, data_dir={data_dir!r}))\n"
      "assert s[0]['image'].shape == (24, 24, 3)\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == "[]"


def test_linear_probe_on_tfds_data(data_dir):
  """A linear probe on a tiny untrained ViT, end to end on the TFDS data: the label is the
  brightest channel, linear in the pixels, so the probe is far above chance (1/3)."""
  config = vip_tiny.get_config()
  config.evals = ml_collections.ConfigDict(dict(colour=dict(
      type="linear_probe", blocks=0, train_size=NUM_TRAIN, test_size=NUM_TEST, steps=100,
      batch_size=32, data=dict(source="tfds", name="dpvl_test_colours", split="train+test",
                               image_size=32, data_dir=data_dir))))
  objective = build_objective(config)
  (evaluator,) = evaluate.build_evaluators(config, objective)
  metrics = evaluator(jax.jit(objective.init)(jax.random.key(0)))
  assert metrics["colour/skipped"] == 0
  assert metrics["colour/train_top1"] > 0.9 and metrics["colour/top1"] > 0.8, metrics
