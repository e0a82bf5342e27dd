"""Real tar shards for tests: img2dataset's layout (KEY.jpg, KEY.txt, KEY.json), PIL JPEGs,
and the broken records a web crawl brings (each kind named by the reason it is counted as).

Tests import it as a module (`from tests.data import webdata`); the shards most tests share are
the `shards` fixture of tests/data/conftest.py.
"""

import collections
import io
import json
import tarfile

import numpy as np
from PIL import Image

from dpvl.data import errors


def jpeg(seed: int, height: int = 24, width: int = 30, fmt: str = "JPEG") -> bytes:
  """A small smooth colour image, encoded."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  channels = [np.sin(x * rng.uniform(0.05, 0.4) + y * rng.uniform(0.05, 0.4) + rng.uniform(0, 6))
              for _ in range(3)]
  image = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(image).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return out.getvalue()


# Broken records (the member that breaks them), by the reason they are counted as.
BROKEN = {
    "corrupt_image": lambda seed: dict(jpg=b"\xff\xd8 not really a jpeg " * 4),
    "truncated_image": lambda seed: dict(jpg=jpeg(seed)[:200]),
    "empty_caption": lambda seed: dict(txt=b" \n\t "),
    "non_utf8_caption": lambda seed: dict(txt=b"a caf\xe9 in latin-1"),
    "missing_caption": lambda seed: dict(txt=None),
}
# How a loader counts each kind (a truncated JPEG is a corrupt image).
REASON = {"truncated_image": "corrupt_image"}


def write_shard(path, first: int, count: int, broken: dict | None = None,
                truncate: bool = False) -> dict:
  """Writes records first..first+count-1 to the tar `path`; `broken` maps a record number to a
  BROKEN kind. With `truncate`, the file is cut in the middle of its last image. Returns
  {number: caption} of the intact records."""
  broken = broken or {}
  captions = {}
  with tarfile.open(path, "w") as tar:
    for n in range(first, first + count):
      key = f"{n:09d}"
      caption = f"Photo  number {n}\nof a\tthing "
      parts = dict(jpg=jpeg(n), txt=caption.encode(),
                   json=json.dumps(dict(key=key, url=f"http://x/{n}")).encode())
      if n in broken:
        parts.update(BROKEN[broken[n]](n))
      else:
        captions[n] = f"Photo number {n} of a thing"
      for ext, data in parts.items():
        if data is None:
          continue
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  if truncate:
    data = open(path, "rb").read()
    last_jpg = data.rfind(f"{first + count - 1:09d}.jpg".encode())
    open(path, "wb").write(data[:last_jpg + 512 + 100])  # header + 100 bytes of the image
    captions.pop(first + count - 1, None)
  return captions


def read_all(source):
  """{key: record} of the readable records and the reasons of the others."""
  good, bad = {}, collections.Counter()
  for i in range(len(source)):
    try:
      record = source[i]
    except errors.BadRecord as e:
      bad[e.reason] += 1
    else:
      good[record["key"]] = record
  return good, bad
