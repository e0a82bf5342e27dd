"""The tar-shard source: real JPEGs and broken records, random access by index, cached
indices, and DP training on tar shards with every bad record counted by reason."""

import collections
import json
import os

import numpy as np
import pytest

from dpvl import config as config_lib
from dpvl import train
from dpvl.data import errors
from dpvl.data import sources
from dpvl.data import transforms
from dpvl.data import webdataset
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import sampling
from dpvl.privacy import secrets as secrets_lib
from tests.data import webdata
from tests.helpers import data_config
from tests.helpers import raises_config_error


def test_expand_shards(tmp_path):
  assert webdataset.expand_shards("a/{008..011}.tar") == [
      "a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
  assert webdataset.expand_shards("x.tar, y.tar") == ["x.tar", "y.tar"]
  for name in ("b.tar", "a.tar", "c.txt"):
    (tmp_path / name).write_bytes(b"")
  assert webdataset.expand_shards(str(tmp_path / "*.tar")) == [
      str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


def test_tar_source_indexes_complete_records_and_counts_the_rest(shards):
  source = webdataset.WebDatasetSource(shards["spec"], image_size=16)
  # 120 records written: one without a caption and one cut off by the truncated tar are not
  # in the index; the missing shard holds nothing.
  assert len(source) == 118
  assert source.rejected == {"missing_caption": 1, "truncated_tar": 1}
  assert [os.path.basename(u) for u in source.missing_shards] == ["00003.tar"]
  good, bad = webdata.read_all(source)
  expected_bad = collections.Counter(webdata.REASON.get(k, k) for n, k in shards["broken"].items()
                                     if k != "missing_caption")
  assert bad == expected_bad
  assert {int(k): r["caption"] for k, r in good.items()} == shards["captions"]
  record = good["000000007"]
  assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
  assert record["json"] == dict(key="000000007", url="http://x/7")
  np.testing.assert_array_equal(
      record["image"],
      transforms.resize_center_crop(transforms.decode_image(webdata.jpeg(7), min_size=16), 16))
  assert source[record["index"]]["key"] == "000000007"  # random access by index


def test_a_tar_cut_inside_a_header_loses_only_its_last_record(tmp_path):
  webdata.write_shard(tmp_path / "0.tar", 0, 3)
  data = (tmp_path / "0.tar").read_bytes()
  cut = data.index(b"000000002.txt") + 100  # inside the caption's header
  (tmp_path / "0.tar").write_bytes(data[:cut])
  source = webdataset.WebDatasetSource(str(tmp_path / "0.tar"), 16)
  assert len(source) == 2 and source.rejected == {"truncated_tar": 1}
  assert [source[i]["key"] for i in range(2)] == ["000000000", "000000001"]


def test_tar_source_fails_fast_without_records(tmp_path):
  with pytest.raises(ValueError, match="no complete record"):
    webdataset.WebDatasetSource(str(tmp_path / "{0..3}.tar"), 16)
  (tmp_path / "empty.tar").write_bytes(b"")
  (tmp_path / "zeros.tar").write_bytes(bytes(10240))  # a valid tar with no member
  with pytest.raises(ValueError, match=r"no complete record.*rejected \{\}"):
    webdataset.WebDatasetSource(f"{tmp_path}/empty.tar,{tmp_path}/zeros.tar", 16)
  (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 50)
  with pytest.raises(ValueError, match="'truncated_tar': 1"):
    webdataset.WebDatasetSource(str(tmp_path / "junk.tar"), 16)
  with pytest.raises(ValueError, match="names no tar shard"):
    webdataset.WebDatasetSource(str(tmp_path / "*.nothing"), 16)


def test_shard_indices_are_cached(shards, tmp_path):
  cache = str(tmp_path / "cache")
  first = webdataset.WebDatasetSource(shards["spec"], 16, index_cache=cache)
  assert len(os.listdir(cache)) == 3  # one per existing shard
  again = webdataset.WebDatasetSource(shards["spec"], 16, index_cache=cache)
  assert len(again) == len(first) and again.rejected == first.rejected
  assert again[5]["caption"] == first[5]["caption"]


def test_a_shard_lost_after_indexing_makes_its_records_missing(tmp_path):
  webdata.write_shard(tmp_path / "0.tar", 0, 3)
  webdata.write_shard(tmp_path / "1.tar", 3, 3)
  source = webdataset.WebDatasetSource(str(tmp_path / "{0..1}.tar"), 16)
  os.remove(tmp_path / "1.tar")
  good, bad = webdata.read_all(source)
  assert len(good) == 3 and bad == {"missing_shard": 3}


def test_webdataset_shards(tmp_path):
  with raises_config_error("names no tar shard"):
    webdataset.WebDatasetSource(str(tmp_path / "*.tar"), 16)
  with raises_config_error("data.crop must be one of"):
    webdataset.WebDatasetSource(str(tmp_path / "a.tar"), 16, crop="zoom")
  with raises_config_error(r"no complete record \(1 shards listed, 1 missing"):
    webdataset.WebDatasetSource(str(tmp_path / "a.tar"), 16)
  webdata.write_shard(tmp_path / "00.tar", 0, 2)
  with raises_config_error(r"names a directory, .*; name its tar shards"):
    sources.build_source(data_config(source="webdataset", path=str(tmp_path), image_size=16))
  assert len(webdataset.WebDatasetSource(str(tmp_path / "*.tar"), 16)) == 2


# -- DP training on tar shards --------------------------------------------------------------


def _expected_skips(config, source, steps):
  """The reasons of the bad records the run's Poisson batches select, recomputed."""
  plan = plan_lib.build_plan(config)
  seed = secrets_lib.RunSecrets.from_test_seed(config.privacy.seed).sampler_seed(0)
  sampler = sampling.PoissonSampler(plan.dataset_size, plan.sampling_rate, plan.capacity, seed)
  counts = collections.Counter()
  for step in range(steps):
    selection = sampler.select(step)
    for index in selection.indices[selection.mask]:
      try:
        source[index]
      except errors.BadRecord as e:
        counts[e.reason] += 1
  return counts


def test_dp_training_on_tar_shards_counts_bad_records(shards, tmp_path, web_config):
  config = web_config("webdataset", shards["spec"], 118)
  config.data.workers = 2  # decoding in worker processes
  logs = []
  train.run(config, str(tmp_path), log=logs.append)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4]
  expected = _expected_skips(config, sources.build_source(config.data), 4)
  assert sum(expected.values()) > 0  # q = 32/118: the broken records are drawn
  assert rows[-1]["private_data_diagnostics"]["skipped"] == dict(expected)
  assert all(np.isfinite(r["private_data_diagnostics"]["loss"]) and r["data_wait_seconds"] >= 0
             for r in rows)
  assert f"skipped records: {dict(expected)}" in logs


def test_warm_start_only_from_public_data(shards, tmp_path, dpcap_config, web_config):
  """A non-private stage 1 on the private tar shards cannot seed a private run; declared
  public, it can, except for a private run on those same shards."""
  stage1 = web_config("webdataset", shards["spec"], 118)
  stage1.privacy.enabled = False
  stage1.steps = 2
  train.run(stage1, str(tmp_path / "on_private"), log=lambda *_: None)
  stage1.data.public = True
  train.run(stage1, str(tmp_path / "declared"), log=lambda *_: None)

  on_shards = web_config("webdataset", shards["spec"], 118)
  on_shards.init_from = str(tmp_path / "on_private")
  with pytest.raises(config_lib.ConfigError, match="which is private"):
    train.run(on_shards, str(tmp_path / "refused"), log=lambda *_: None)
  on_shards.init_from = str(tmp_path / "declared")
  with pytest.raises(config_lib.ConfigError, match="the data this run trains on privately"):
    train.run(on_shards, str(tmp_path / "refused_too"), log=lambda *_: None)
  assert not os.path.exists(tmp_path / "refused" / "privacy.json")
  assert not os.path.exists(tmp_path / "refused" / "config.json")

  on_scenes = dpcap_config()
  on_scenes.steps = 1
  on_scenes.init_from = str(tmp_path / "declared")
  entry = train.run(on_scenes, str(tmp_path / "stage2"), log=lambda *_: None)
  assert entry["init_from"]["data"]["public"] == "declared"
  assert entry["init_from"]["data"]["source"] == "webdataset"
  assert entry["data"]["source"] == "shape_scenes"
