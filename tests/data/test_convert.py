"""Conversion of tar shards to ArrayRecord: the good records written, the rejected counted,
resuming from finished shards, the command's report."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np

from dpvl.data import arrayrecord
from dpvl.data import convert
from dpvl.data import webdataset
from tests.data import webdata

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


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
  good, bad = webdata.read_all(source)
  assert not bad
  assert {int(k): r["caption"] for k, r in good.items()} == shards["captions"]
  from_tar, _ = webdata.read_all(webdataset.WebDatasetSource(shards["spec"], 16))
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
