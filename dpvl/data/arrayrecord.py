"""ArrayRecord datasets written by `dpvl.data.convert`: grain's native random-access format.

A dataset directory holds `shard-XXXXX.array_record` files (one entry per record: its raw
members, `records.pack`) and `index.json`: `num_records` (N, public: the accountant's dataset
size), the shards with their record counts, and what the conversion rejected, by reason.
"""

import bisect
import dataclasses
import json

from etils import epath
import grain

from dpvl import config as config_lib
from dpvl.data import errors
from dpvl.data import records

INDEX = "index.json"


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
  """grain/array_record's FileInstruction protocol: read a shard without counting it first."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


def read_index(directory: str) -> dict:
  """The index of the dataset in `directory`; ConfigError if it is missing or malformed."""
  path = epath.Path(directory) / INDEX
  if not path.exists():
    raise config_lib.ConfigError(f"data.path={directory!r} has no {INDEX}; write one with "
                                 "`python -m dpvl.data.convert --from=SHARDS --to=DIR`.")
  try:
    index = json.loads(path.read_text())
  except ValueError as e:
    raise config_lib.ConfigError(f"{path} is not valid JSON ({e}); rewrite it with `python -m "
                                 "dpvl.data.convert`.") from None
  shards = index.get("shards") if isinstance(index, dict) else None
  if not isinstance(shards, list) or not all(
      isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("records"), int)
      for s in shards):
    raise config_lib.ConfigError(f"{path} is not an index as `python -m dpvl.data.convert` "
                                 "writes one (no list of shards with file and records).")
  return index


class ArrayRecordSource:
  """Random-access source (grain `RandomAccessDataSource` protocol) over a converted dataset.

  Record i: see `records.decode`. N comes from `index.json`; shards are opened lazily, and a
  shard that cannot be opened makes its records `missing_shard`.
  """

  def __init__(self, directory: str, image_size: int, crop: str = "center"):
    if crop not in records.CROPS:
      raise config_lib.ConfigError(f"data.crop must be one of {records.CROPS}, got {crop!r}.")
    index = read_index(directory)
    shards = [s for s in index["shards"] if s["records"] > 0]
    if not shards:
      raise config_lib.ConfigError(f"data.path={directory!r} holds no record (rejected: "
                                   f"{index.get('rejected', {})}).")
    root = epath.Path(directory)
    self._files = [str(root / s["file"]) for s in shards]
    self._starts, total = [], 0
    for s in shards:
      self._starts.append(total)
      total += s["records"]
    self._n = total
    self.rejected = dict(index.get("rejected", {}))
    self._source = grain.sources.ArrayRecordDataSource(
        [_FileInstruction(f, 0, s["records"], s["records"]) for f, s in zip(self._files, shards)])
    self._size, self._crop = int(image_size), crop

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    index = errors.check_index(index, self._n)
    try:
      blob = self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      shard = self._files[bisect.bisect_right(self._starts, index) - 1]
      if not epath.Path(shard).exists():
        raise errors.BadRecord(errors.MISSING_SHARD, shard) from None
      raise errors.BadRecord(errors.UNREADABLE_RECORD, f"{type(e).__name__}") from None
    return records.decode(records.unpack(blob), index, self._size, self._crop)

  def __repr__(self) -> str:
    return (f"ArrayRecordSource({len(self._files)} shards, {self._n} records, "
            f"image_size={self._size}, crop={self._crop!r})")
