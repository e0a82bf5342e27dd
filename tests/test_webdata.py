"""Web-scale data: tar shards with real JPEGs and broken records, random access by index, the
ArrayRecord converter, and DP training on both, with every bad record counted by reason."""

import collections
import json
import os
import pickle
import subprocess
import sys

from conftest import small_dpcap_config
import numpy as np
import pytest
import webdata_fixtures as wf

from dpvl import config as config_lib
from dpvl import train
from dpvl.data import arrayrecord
from dpvl.data import convert
from dpvl.data import errors
from dpvl.data import records
from dpvl.data import sources
from dpvl.data import transforms
from dpvl.data import webdataset
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import sampling
from dpvl.privacy import secrets as secrets_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Three shards of 40 records; shard 1 has one record of each broken kind, shard 2 is cut short
# in its last image; shard 3 is listed but missing.
BROKEN = {41: "corrupt_image", 45: "truncated_image", 50: "empty_caption",
          57: "non_utf8_caption", 63: "missing_caption"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  captions = {}
  captions.update(wf.write_shard(root / "00000.tar", 0, 40))
  captions.update(wf.write_shard(root / "00001.tar", 40, 40, BROKEN))
  captions.update(wf.write_shard(root / "00002.tar", 80, 40, truncate=True))
  return dict(spec=str(root / "{00000..00003}.tar"), captions=captions, root=root)


def _read_all(source):
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


# -- transforms ----------------------------------------------------------------------------


def test_decode_jpeg_and_png_and_name_corrupt_images():
  png = transforms.decode_image(wf.jpeg(3, fmt="PNG"))
  jpg = transforms.decode_image(wf.jpeg(3))
  assert png.shape == jpg.shape == (24, 30, 3) and png.dtype == jpg.dtype == np.uint8
  assert np.abs(png.astype(int) - jpg.astype(int)).mean() < 8  # same picture, lossy JPEG
  small = transforms.decode_image(wf.jpeg(3, 200, 300), min_size=16)
  assert min(small.shape[:2]) >= 16 and small.shape[0] < 200  # decoded at a DCT scale
  for data in (b"", b"\xff\xd8 garbage", wf.jpeg(3)[:150], wf.jpeg(3, fmt="PNG")[:100]):
    with pytest.raises(errors.BadRecord) as info:
      transforms.decode_image(data)
    assert info.value.reason == "corrupt_image"


def test_random_resized_crop_is_seeded_per_record():
  image = transforms.decode_image(wf.jpeg(5, 60, 80))
  crop = lambda seed, index: transforms.random_resized_crop(
      image, 16, np.random.default_rng([seed, index]))
  assert crop(0, 1).shape == (16, 16, 3) and crop(0, 1).dtype == np.uint8
  np.testing.assert_array_equal(crop(0, 1), crop(0, 1))
  assert not np.array_equal(crop(0, 1), crop(0, 2))
  assert not np.array_equal(crop(0, 1), crop(1, 1))
  parts = dict(jpg=wf.jpeg(5, 60, 80), txt=b"x")
  a = records.decode(parts, 7, 16, "random_resized", seed=3)["image"]
  np.testing.assert_array_equal(a, records.decode(parts, 7, 16, "random_resized", 3)["image"])
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


# -- the tar source ---------------------------------------------------------------------------


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
  good, bad = _read_all(source)
  expected_bad = collections.Counter(wf.REASON.get(k, k) for n, k in BROKEN.items()
                                     if k != "missing_caption")
  assert bad == expected_bad
  assert {int(k): r["caption"] for k, r in good.items()} == shards["captions"]
  record = good["000000007"]
  assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
  assert record["json"] == dict(key="000000007", url="http://x/7")
  np.testing.assert_array_equal(
      record["image"],
      transforms.resize_center_crop(transforms.decode_image(wf.jpeg(7), min_size=16), 16))
  assert source[record["index"]]["key"] == "000000007"  # random access by index


def test_a_tar_cut_inside_a_header_loses_only_its_last_record(tmp_path):
  wf.write_shard(tmp_path / "0.tar", 0, 3)
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
  wf.write_shard(tmp_path / "0.tar", 0, 3)
  wf.write_shard(tmp_path / "1.tar", 3, 3)
  source = webdataset.WebDatasetSource(str(tmp_path / "{0..1}.tar"), 16)
  os.remove(tmp_path / "1.tar")
  good, bad = _read_all(source)
  assert len(good) == 3 and bad == {"missing_shard": 3}


# -- conversion to ArrayRecord ----------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(shards, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("arrayrecord"))
  index = convert.convert(shards["spec"], out, workers=2, log=lambda *_: None)
  return dict(out=out, index=index)


def test_converter_writes_the_good_records_and_counts_the_rejected(shards, converted):
  index = converted["index"]
  assert index["num_records"] == len(shards["captions"]) == 114
  assert index["rejected"] == {"corrupt_image": 2, "empty_caption": 1, "missing_caption": 1,
                               "non_utf8_caption": 1, "truncated_tar": 1}
  assert [s["records"] for s in index["shards"]] == [40, 35, 39]
  assert [os.path.basename(s) for s in index["missing_shards"]] == ["00003.tar"]
  assert json.load(open(os.path.join(converted["out"], "index.json"))) == index
  source = arrayrecord.ArrayRecordSource(converted["out"], image_size=16)
  assert len(source) == 114 and source.rejected == index["rejected"]
  copy = pickle.loads(pickle.dumps(source))  # as worker processes receive it
  np.testing.assert_array_equal(copy[3]["image"], source[3]["image"])
  good, bad = _read_all(source)
  assert not bad
  assert {int(k): r["caption"] for k, r in good.items()} == shards["captions"]
  from_tar, _ = _read_all(webdataset.WebDatasetSource(shards["spec"], 16))
  assert set(from_tar) == set(good)
  for key in ("000000000", "000000046", "000000118"):  # the same record from either format
    np.testing.assert_array_equal(good[key]["image"], from_tar[key]["image"])
    assert good[key]["json"] == from_tar[key]["json"]


def test_conversion_resumes_from_finished_shards(shards, converted, tmp_path):
  out = tmp_path / "resume"
  convert.convert(shards["spec"], str(out), workers=1, log=lambda *_: None)
  finished = out / "shard-00000.array_record"
  stamp = os.stat(finished).st_mtime_ns
  os.remove(out / "shard-00001.json")  # as if interrupted while writing shard 1
  os.remove(out / "index.json")
  index = convert.convert(shards["spec"], str(out), workers=1, log=lambda *_: None)
  assert os.stat(finished).st_mtime_ns == stamp  # not rewritten
  assert index == converted["index"] and not list(out.glob("*.tmp"))


def test_convert_command_reports_counts(shards, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dpvl.data.convert", f"--from={shards['root']}/0000[01].tar",
       f"--to={tmp_path / 'out'}", "--workers=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
  assert "records written: 75" in result.stdout
  assert "'corrupt_image': 2" in result.stdout and "'missing_caption': 1" in result.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "dpvl.data.convert", f"--from={tmp_path}/none-*.tar",
       f"--to={tmp_path / 'none'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "no tar shard" in bad.stderr


def test_array_record_source_checks_its_directory(converted, tmp_path):
  with pytest.raises(ValueError, match="dpvl.data.convert"):
    arrayrecord.ArrayRecordSource(str(tmp_path), 16)
  cfg = dict(source="array_record", image_size=16, size=1, seed=0)
  with pytest.raises(ValueError, match="data.path is required"):
    sources.build_source(types_namespace(cfg))
  with pytest.raises(ValueError, match="data.crop"):
    arrayrecord.ArrayRecordSource(converted["out"], 16, crop="zoom")
  (tmp_path / "index.json").write_text("{not json")
  with pytest.raises(ValueError, match=f"{tmp_path / 'index.json'} is not valid JSON"):
    arrayrecord.ArrayRecordSource(str(tmp_path), 16)


def types_namespace(d):
  import types  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(**d)


def test_tfds_source_is_optional_with_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  cfg = types_namespace(dict(source="tfds", name="cifar10", split="test", image_size=16))
  with pytest.raises(ValueError, match="pip install tensorflow-datasets"):
    sources.build_source(cfg)


# -- training on web data -------------------------------------------------------------------


def _web_config(source: str, path: str, size: int):
  c = small_dpcap_config()
  c.steps = 4
  c.log_every = 2
  c.data.source = source
  c.data.path = path
  c.data.size = size
  c.data.crop = "random_resized"
  return c


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


def test_dp_training_on_tar_shards_counts_bad_records(shards, tmp_path):
  config = _web_config("webdataset", shards["spec"], 118)
  config.data.workers = 2  # decoding in worker processes
  logs = []
  train.run(config, str(tmp_path), log=logs.append)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4]
  expected = _expected_skips(config, sources.build_source(config.data), 4)
  assert sum(expected.values()) > 0  # q = 32/118: the broken records are drawn
  assert rows[-1]["skipped"] == dict(expected)
  assert all(np.isfinite(r["loss"]) and r["data_wait_seconds"] >= 0 for r in rows)
  assert f"skipped records: {dict(expected)}" in logs


def test_dp_training_on_converted_array_records(converted, tmp_path):
  config = _web_config("array_record", converted["out"], 114)
  entry = train.run(config, str(tmp_path), log=lambda *_: None)
  assert entry["steps_done"] == 4 and entry["dataset_size"] == 114
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["skipped"] == {} and rows[-1]["examples"] > 0  # bad ones were converted out
  config.data.size = 120
  with pytest.raises(config_lib.ConfigError, match="114"):
    train.run(config, str(tmp_path / "wrong_size"), log=lambda *_: None)


def test_a_dataset_that_yields_nothing_stops_before_spending(tmp_path):
  wf.write_shard(tmp_path / "00000.tar", 0, 40, {n: "corrupt_image" for n in range(40)})
  config = _web_config("webdataset", str(tmp_path / "00000.tar"), 40)
  with pytest.raises(errors.TooManyBadRecords,
                     match=r"(\d+) of the \1 records drawn in the last 1 steps"):
    train.run(config, str(tmp_path / "run"), log=lambda *_: None)
  ledger = json.load(open(tmp_path / "run" / "privacy.json"))
  assert ledger["status"] == "stopped_bad_data" and ledger["steps_done"] == 0
  assert ledger["epsilon_spent"] == 0.0


def test_skip_rate_check_stops_only_far_above_the_threshold():
  assert errors.too_many_skipped(32, 32, 0.05) and errors.too_many_skipped(30, 1000, 0.01)
  assert not errors.too_many_skipped(3, 64, 0.05)  # a few bad records: train on
  assert not errors.too_many_skipped(0, 10, 0.0) and errors.too_many_skipped(1, 10, 0.0)
  assert not errors.too_many_skipped(10, 10, 1.0)


def test_warm_start_only_from_public_data(shards, tmp_path):
  """A non-private stage 1 on the private tar shards cannot seed a private run; declared
  public, it can, except for a private run on those same shards."""
  stage1 = _web_config("webdataset", shards["spec"], 118)
  stage1.privacy.enabled = False
  stage1.steps = 2
  train.run(stage1, str(tmp_path / "on_private"), log=lambda *_: None)
  stage1.data.public = True
  train.run(stage1, str(tmp_path / "declared"), log=lambda *_: None)

  on_shards = _web_config("webdataset", shards["spec"], 118)
  on_shards.init_from = str(tmp_path / "on_private")
  with pytest.raises(config_lib.ConfigError, match="which is private"):
    train.run(on_shards, str(tmp_path / "refused"), log=lambda *_: None)
  on_shards.init_from = str(tmp_path / "declared")
  with pytest.raises(config_lib.ConfigError, match="the data this run trains on privately"):
    train.run(on_shards, str(tmp_path / "refused_too"), log=lambda *_: None)
  assert not os.path.exists(tmp_path / "refused" / "privacy.json")
  assert not os.path.exists(tmp_path / "refused" / "config.json")

  on_scenes = small_dpcap_config()
  on_scenes.steps = 1
  on_scenes.init_from = str(tmp_path / "declared")
  entry = train.run(on_scenes, str(tmp_path / "stage2"), log=lambda *_: None)
  assert entry["init_from"]["data"]["public"] == "declared"
  assert entry["init_from"]["data"]["source"] == "webdataset"
  assert entry["data"]["source"] == "shape_scenes"


class _FakeTfds:
  """The slice of tensorflow_datasets that TfdsSource uses: a prepared labelled split."""

  class download:  # pylint: disable=invalid-name
    DownloadConfig = dict

  def __init__(self, prepared):
    self.prepared, self.prepare_calls = prepared, []

  def builder(self, name, data_dir, file_format):
    assert (name, file_format) == ("cifar10", "array_record")
    fake = self
    images = [np.full((20, 24, 1 if i % 2 else 3), i, np.uint8) for i in range(6)]

    class Builder:
      info = types_namespace(dict(features=dict(label=types_namespace(dict(num_classes=10)))))

      def is_prepared(self):
        return fake.prepared

      def download_and_prepare(self, download_config):
        fake.prepare_calls.append(download_config)

      def as_data_source(self, split):
        assert split == "test"
        return [dict(image=im, label=np.int64(i % 10)) for i, im in enumerate(images)]

    return Builder()


def test_tfds_labelled_source_with_a_stand_in_for_tfds(monkeypatch):
  cfg = types_namespace(dict(source="tfds", name="cifar10", split="test", image_size=16,
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
