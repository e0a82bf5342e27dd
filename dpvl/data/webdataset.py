"""Random access into webdataset tar shards (img2dataset's `KEY.jpg` + `KEY.txt` + `KEY.json`).

A tar shard is read sequentially by webdataset; Poisson sampling needs any record at any step.
`index_shard` scans a shard's tar headers once (O(members), member data is skipped) and keeps,
per key, the offset and size of each member; `WebDatasetSource` then reads a record's members
by seeking. Shards are local paths or any `etils.epath` URL (gs://, ...).

What is in the index is the dataset: N = the number of complete keys (an image and a caption
member both inside the file). Keys cut off by a truncated tar and keys lacking a member are
left out and counted by reason in `rejected`; listed shards that do not exist are counted in
`missing_shards` (fails fast when no record is left). A shard that disappears after indexing
makes its records `missing_shard` at read time: padding, counted, and the run goes on.
"""

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import os
import re
import tarfile

from etils import epath

from dpvl import config as config_lib
from dpvl.data import errors
from dpvl.data import records

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec) -> list[str]:
  """Shard URLs of `spec`: a list, comma-separated names, `{000..099}` ranges, or a glob."""
  names = list(spec) if isinstance(spec, (list, tuple)) else [
      s.strip() for s in str(spec).split(",") if s.strip()]
  out = []
  for name in names:
    match = _BRACES.search(name)
    if match:
      lo, hi = match.group(1), match.group(2)
      out += expand_shards([name[:match.start()] + str(i).zfill(len(lo)) + name[match.end():]
                            for i in range(int(lo), int(hi) + 1)])
    elif any(c in name for c in "*?["):
      if "://" in name:
        parent, pattern = name.rsplit("/", 1)
        out += sorted(str(p) for p in epath.Path(parent).glob(pattern))
      else:
        out += sorted(glob.glob(name))
    else:
      out.append(name)
  return out


def split_name(name: str) -> tuple[str, str]:
  """webdataset's convention: key = path up to the first dot of the base name, ext = the rest."""
  folder, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclasses.dataclass
class ShardIndex:
  url: str
  keys: list            # [key, {ext: [offset, size]}] of the complete records, in tar order
  rejected: dict        # reason -> records left out
  size: int             # bytes of the shard when indexed

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def index_shard(url: str) -> ShardIndex:
  """Scans the tar headers of `url`; raises FileNotFoundError if it does not exist."""
  path = epath.Path(url)
  members = collections.OrderedDict()
  rejected = collections.Counter()
  with path.open("rb") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    try:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        while True:
          info = tar.next()
          if info is None:
            break
          if not info.isfile():
            continue
          key, ext = split_name(info.name)
          if info.offset_data + info.size > size:  # cut off by the end of the file
            members.setdefault(key, {})["__truncated__"] = True
            break
          members.setdefault(key, {})[ext] = [info.offset_data, info.size]
        f.seek(tar.offset)
        if members and f.read(1 << 16).strip(b"\0"):  # the scan stopped inside a header
          members[next(reversed(members))]["__truncated__"] = True
    except (tarfile.ReadError, EOFError):  # a header that does not parse
      if members:  # the record being read when it broke off is incomplete
        members[next(reversed(members))]["__truncated__"] = True
      else:
        f.seek(0)
        if f.read(1 << 16).strip(b"\0"):  # not an empty archive: a broken one
          rejected[errors.TRUNCATED_TAR] += 1
  keys = []
  for key, parts in members.items():
    if parts.pop("__truncated__", False):
      rejected[errors.TRUNCATED_TAR] += 1
      continue
    try:
      records.check_parts(parts)
    except errors.BadRecord as e:
      rejected[e.reason] += 1
      continue
    keys.append([key, parts])
  return ShardIndex(url, keys, dict(rejected), size)


def _cached_index(url: str, cache_dir: str | None) -> ShardIndex:
  if not cache_dir:
    return index_shard(url)
  name = hashlib.sha1(url.encode()).hexdigest()[:16] + ".json"
  cached = epath.Path(cache_dir) / name
  if cached.exists():
    data = json.loads(cached.read_text())
    with epath.Path(url).open("rb") as f:
      f.seek(0, os.SEEK_END)
      if f.tell() == data["size"]:
        return ShardIndex(**data)
  index = index_shard(url)
  epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
  tmp = cached.parent / (name + ".tmp")
  tmp.write_text(json.dumps(index.to_json()))
  tmp.replace(cached)
  return index


def index_shards(urls: list[str], cache_dir: str | None = None, threads: int = 16):
  """(shard indices of the shards that exist, URLs that do not), in the order of `urls`.

  Args:
    urls: the tar shards' paths or URLs.
    cache_dir: where shard indices are cached (by URL, reused while the shard's size is
      unchanged); None or "" to scan every shard.
    threads: the most shards indexed at once.

  Returns:
    (list of `ShardIndex` of the shards found, list of the URLs not found). Other errors of
    reading a shard (e.g. IsADirectoryError) propagate.
  """
  def one(url):
    try:
      return _cached_index(url, cache_dir)
    except FileNotFoundError:
      return None
  with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
    found = list(pool.map(one, urls))
  return ([i for i in found if i is not None],
          [u for u, i in zip(urls, found) if i is None])


def read_parts(f, parts: dict) -> dict:
  """The members {ext: bytes} at `parts` {ext: [offset, size]} of the open shard `f`."""
  out = {}
  for ext, (offset, size) in parts.items():
    f.seek(offset)
    out[ext] = f.read(size)
    if len(out[ext]) != size:
      raise errors.BadRecord(errors.TRUNCATED_TAR, f"{ext} at {offset}")
  return out


def read_members(url: str, parts: dict) -> dict:
  """The members {ext: bytes} of one record; raises BadRecord(missing_shard/truncated_tar)."""
  try:
    with epath.Path(url).open("rb") as f:
      return read_parts(f, parts)
  except FileNotFoundError:
    raise errors.BadRecord(errors.MISSING_SHARD, url) from None


class WebDatasetSource:
  """Random-access source (grain `RandomAccessDataSource` protocol) over indexed tar shards.

  Record i: see `records.decode` (image resized to `image_size`, cropped per `crop`).
  """

  def __init__(self, shards, image_size: int, crop: str = "center",
               index_cache: str | None = None):
    urls = expand_shards(shards)
    if not urls:
      raise config_lib.ConfigError(f"data.path={shards!r} names no tar shard.")
    if crop not in records.CROPS:
      raise config_lib.ConfigError(f"data.crop must be one of {records.CROPS}, got {crop!r}.")
    try:
      indices, self.missing_shards = index_shards(urls, index_cache)
    except IsADirectoryError as e:
      raise config_lib.ConfigError(
          f"data.path={shards!r} names a directory, {e.filename}; name its tar shards (a glob "
          "such as DIR/*.tar, a {000..099} range or a comma-separated list).") from None
    self._urls = [i.url for i in indices]
    self._shard, self._parts = [], []
    self.rejected = collections.Counter()
    for shard, index in enumerate(indices):
      self._shard += [shard] * len(index.keys)
      self._parts += index.keys
      self.rejected.update(index.rejected)
    if not self._parts:
      raise config_lib.ConfigError(
          f"data.path={shards!r} holds no complete record ({len(urls)} shards listed, "
          f"{len(self.missing_shards)} missing, rejected {dict(self.rejected)}).")
    self._size, self._crop = int(image_size), crop

  def __len__(self) -> int:
    return len(self._parts)

  def __getitem__(self, index: int) -> dict:
    index = errors.check_index(index, len(self._parts))
    key, where = self._parts[index]
    parts = read_members(self._urls[self._shard[index]], where)
    parts["__key__"] = key
    return records.decode(parts, index, self._size, self._crop)

  def __repr__(self) -> str:
    return (f"WebDatasetSource({len(self._urls)} shards, {len(self)} records, "
            f"image_size={self._size}, crop={self._crop!r})")
