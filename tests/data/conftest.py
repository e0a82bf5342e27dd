"""Fixtures of the data tests: real tar shards, their ArrayRecord conversion, a config on them."""

import pytest

from dpvl.data import convert
from tests.data import webdata

# Three shards of 40 records; shard 1 has one record of each broken kind, shard 2 is cut short
# in its last image; shard 3 is listed but missing.
_BROKEN = {41: "corrupt_image", 45: "truncated_image", 50: "empty_caption",
           57: "non_utf8_caption", 63: "missing_caption"}


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
  """The shards above: dict(spec, captions of the intact records, root, broken)."""
  root = tmp_path_factory.mktemp("shards")
  captions = {}
  captions.update(webdata.write_shard(root / "00000.tar", 0, 40))
  captions.update(webdata.write_shard(root / "00001.tar", 40, 40, _BROKEN))
  captions.update(webdata.write_shard(root / "00002.tar", 80, 40, truncate=True))
  return dict(spec=str(root / "{00000..00003}.tar"), captions=captions, root=root,
              broken=_BROKEN)


@pytest.fixture(scope="session")
def converted(shards, tmp_path_factory):
  """`shards` converted to ArrayRecord: dict(out=the directory, index=its index.json)."""
  out = str(tmp_path_factory.mktemp("arrayrecord"))
  index = convert.convert(shards["spec"], out, workers=2, log=lambda *_: None)
  return dict(out=out, index=index)


@pytest.fixture(scope="session")
def web_config(dpcap_config):
  """Builder of the small DP-Cap config on web data: `web_config(source, path, size)`."""

  def build(source: str, path: str, size: int):
    c = dpcap_config()
    c.steps = 4
    c.log_every = 2
    c.data.source = source
    c.data.path = path
    c.data.size = size
    c.data.crop = "random_resized"
    return c

  return build
