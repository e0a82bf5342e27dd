"""TFDS datasets: optional with a clear error, a labelled source, every bad field named
(a stand-in for tensorflow_datasets: nothing is downloaded)."""

import sys
import types

import numpy as np
import pytest

from dpvl.data import sources
from tests.helpers import data_config
from tests.helpers import namespace
from tests.helpers import raises_config_error


def test_tfds_source_is_optional_with_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  cfg = namespace(dict(source="tfds", name="cifar10", split="test", image_size=16))
  with pytest.raises(ValueError, match="pip install tensorflow-datasets"):
    sources.build_source(cfg)


class _FakeTfds:
  """The slice of tensorflow_datasets that TfdsSource uses: a prepared labelled split."""

  download = types.SimpleNamespace(DownloadConfig=dict)  # tfds.download.DownloadConfig

  def __init__(self, prepared):
    self.prepared, self.prepare_calls = prepared, []

  def builder(self, name, data_dir, file_format):
    assert (name, file_format) == ("cifar10", "array_record")
    fake = self
    images = [np.full((20, 24, 1 if i % 2 else 3), i, np.uint8) for i in range(6)]

    class Builder:
      info = namespace(dict(features=dict(label=namespace(dict(num_classes=10)))))

      def is_prepared(self):
        return fake.prepared

      def download_and_prepare(self, download_config):
        fake.prepare_calls.append(download_config)

      def as_data_source(self, split):
        assert split == "test"
        return [dict(image=im, label=np.int64(i % 10)) for i, im in enumerate(images)]

    return Builder()


def test_tfds_labelled_source_with_a_stand_in_for_tfds(monkeypatch):
  cfg = namespace(dict(source="tfds", name="cifar10", split="test", image_size=16,
                             data_dir="/data/tfds", manual_dir=""))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfds(prepared=True))
  source = sources.build_source(cfg)
  assert len(source) == 6 and source.num_classes == 10
  for i in (0, 1):  # colour and grayscale images
    record = source[i]
    assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
    assert record["label"] == i and record["index"] == i and np.all(record["image"] == i)
  unprepared = _FakeTfds(prepared=False)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", unprepared)
  with pytest.raises(ValueError, match="not prepared"):
    sources.build_source(cfg)
  cfg.manual_dir = "/data/manual"
  sources.build_source(cfg)  # prepares from the manual download, nothing fetched
  assert unprepared.prepare_calls == [dict(manual_dir="/data/manual")]


class _FakeTfdsTestSplitOnly:
  """The slice of tensorflow_datasets that TfdsSource uses: "cifar10", split "test" only."""

  download = types.SimpleNamespace(DownloadConfig=dict)  # tfds.download.DownloadConfig

  def __init__(self, prepared=True):
    self.prepared = prepared

  def builder(self, name, data_dir, file_format):
    del data_dir, file_format
    if name != "cifar10":
      raise ValueError(f"Dataset {name} not found.\nAvailable:\n\t- cifar10")
    prepared = self.prepared

    class Builder:

      def is_prepared(self):
        return prepared

      def as_data_source(self, split):
        raise ValueError(f"Unknown split {split!r}. Should be one of ['test'].")

    return Builder()


def test_tfds_source(monkeypatch):
  cfg = data_config(source="tfds", name="cifar11", split="tset", image_size=16, data_dir="/d")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with raises_config_error("pip install tensorflow-datasets"):
    sources.build_source(cfg)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfdsTestSplitOnly())
  # the first line only
  with raises_config_error(r"^data.name='cifar11': Dataset cifar11 not found.$"):
    sources.build_source(cfg)
  cfg.name = "cifar10"
  with raises_config_error(
      r"data.split='tset' of TFDS dataset 'cifar10' cannot be read: Unknown split"):
    sources.build_source(cfg)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfdsTestSplitOnly(prepared=False))
  with raises_config_error(r"not prepared in data_dir='/d'.*data.manual_dir"):
    sources.build_source(cfg)
