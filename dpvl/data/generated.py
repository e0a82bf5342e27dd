"""Base of the generated sources: record i is a pure function of (seed, i), nothing stored."""

from dpvl import config as config_lib
from dpvl.data import errors


class GeneratedSource:
  """Random-access source (grain `RandomAccessDataSource` protocol) of generated records.

  Subclasses implement `record(index) -> dict`; this class checks the arguments (ConfigError
  naming the config.data field each comes from, see `sources`) and the indices.
  """

  def __init__(self, num_records: int, image_size: int, seed: int):
    if num_records < 1:
      raise config_lib.ConfigError(f"num_records (data.size) must be positive, got {num_records}.")
    if image_size < 1:
      raise config_lib.ConfigError(f"image_size (data.image_size) must be positive, got "
                                   f"{image_size}.")
    if seed < 0:
      raise config_lib.ConfigError(f"seed (data.seed) must be non-negative, got {seed}.")
    self._n, self._size, self._seed = int(num_records), int(image_size), int(seed)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    index = errors.check_index(index, self._n)
    return self.record(index)

  def record(self, index: int) -> dict:
    raise NotImplementedError

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(num_records={self._n}, image_size={self._size}, "
            f"seed={self._seed})")
