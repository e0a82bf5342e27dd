"""Labelled TFDS datasets (e.g. `cifar10`, `imagenet2012`) as random-access sources for probes.

TensorFlow Datasets is optional: dpvl's [tfds] extra (`pip install -e ".[tfds]"`). Nothing is
downloaded during a run: the dataset must be prepared in `data_dir` already, or (for datasets
with a manual download, like imagenet2012) be preparable from the archives in `manual_dir`.
Reading a prepared dataset imports no TensorFlow (preparing one may).
Records: `image` uint8 [S, S, 3] (shorter side to S, centre crop), `label`, `index`.
"""

import numpy as np

from dpvl import config as config_lib
from dpvl.data import transforms


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise config_lib.ConfigError("data.source='tfds' needs TensorFlow Datasets: pip install "
                                 "tensorflow-datasets tensorflow-cpu importlib-resources (dpvl's "
                                 "[tfds] extra)") from None
  return tfds


def _first_line(e: Exception) -> str:
  """TFDS's messages can run to many lines (every dataset name): the first one."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


class TfdsSource:
  """Random-access source over a prepared TFDS split (ArrayRecord file format)."""

  def __init__(self, name: str, split: str, image_size: int, data_dir: str | None = None,
               manual_dir: str | None = None, image_key: str = "image",
               label_key: str = "label"):
    tfds = _import_tfds()
    try:  # an unknown name is TFDS's DatasetNotFoundError, a ValueError
      builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except ValueError as e:
      raise config_lib.ConfigError(f"data.name={name!r}: {_first_line(e)}") from None
    if not builder.is_prepared():
      if not manual_dir:
        raise config_lib.ConfigError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}; prepare it there "
            "(tfds build) or set data.manual_dir.")
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    try:  # an unknown split, or a dataset prepared in another file format
      self._source = builder.as_data_source(split=split)
    except (KeyError, ValueError) as e:
      raise config_lib.ConfigError(f"data.split={split!r} of TFDS dataset {name!r} cannot be "
                                   f"read: {_first_line(e)}") from None
    self._size, self._image_key, self._label_key = int(image_size), image_key, label_key
    self.num_classes = builder.info.features[label_key].num_classes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = self._source[int(index)]
    image = np.asarray(example[self._image_key])
    if image.ndim == 2 or image.shape[-1] == 1:  # grayscale datasets
      image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
    image = transforms.resize_center_crop(image, self._size)
    return dict(image=image, label=int(example[self._label_key]), index=int(index))
