"""Bad records: when the skip rate stops a run, and a run on data that yields nothing."""

import json

import pytest

from dpvl import train
from dpvl.data import errors
from tests.data import webdata


def test_skip_rate_check_stops_only_far_above_the_threshold():
  assert errors.too_many_skipped(32, 32, 0.05) and errors.too_many_skipped(30, 1000, 0.01)
  assert not errors.too_many_skipped(3, 64, 0.05)  # a few bad records: train on
  assert not errors.too_many_skipped(0, 10, 0.0) and errors.too_many_skipped(1, 10, 0.0)
  assert not errors.too_many_skipped(10, 10, 1.0)


def test_a_dataset_that_yields_nothing_stops_before_spending(tmp_path, web_config):
  webdata.write_shard(tmp_path / "00000.tar", 0, 40, {n: "corrupt_image" for n in range(40)})
  config = web_config("webdataset", str(tmp_path / "00000.tar"), 40)
  with pytest.raises(errors.TooManyBadRecords,
                     match=r"(\d+) of the \1 records drawn in the last 1 steps"):
    train.run(config, str(tmp_path / "run"), log=lambda *_: None)
  ledger = json.load(open(tmp_path / "run" / "privacy.json"))
  assert ledger["status"] == "stopped_bad_data" and ledger["steps_done"] == 0
  assert ledger["epsilon_spent"] == 0.0
