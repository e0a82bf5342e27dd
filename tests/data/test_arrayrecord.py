"""The ArrayRecord source: its directory and index checked, DP training on converted records."""

import json

import pytest

from dpvl import config as config_lib
from dpvl import train
from dpvl.data import arrayrecord
from dpvl.data import sources
from tests.helpers import data_config
from tests.helpers import namespace
from tests.helpers import raises_config_error


def test_array_record_source_checks_its_directory(converted, tmp_path):
  with pytest.raises(ValueError, match="dpvl.data.convert"):
    arrayrecord.ArrayRecordSource(str(tmp_path), 16)
  cfg = dict(source="array_record", image_size=16, size=1, seed=0)
  with pytest.raises(ValueError, match="data.path is required"):
    sources.build_source(namespace(cfg))
  with pytest.raises(ValueError, match="data.crop"):
    arrayrecord.ArrayRecordSource(converted["out"], 16, crop="zoom")
  (tmp_path / "index.json").write_text("{not json")
  with pytest.raises(ValueError, match=f"{tmp_path / 'index.json'} is not valid JSON"):
    arrayrecord.ArrayRecordSource(str(tmp_path), 16)


def test_array_record_directory(tmp_path):
  cfg = data_config(source="array_record", path=str(tmp_path), image_size=16)
  with raises_config_error(r"data.path=.* has no index.json; .*dpvl.data.convert"):
    sources.build_source(cfg)
  index = tmp_path / "index.json"
  index.write_text("{not json")
  with raises_config_error(f"{index} is not valid JSON"):
    sources.build_source(cfg)
  index.write_text(json.dumps(dict(num_records=3)))
  with raises_config_error(f"{index} is not an index as .*dpvl.data.convert"):
    sources.build_source(cfg)
  index.write_text(json.dumps(dict(num_records=0, rejected={"corrupt_image": 2},
                                   shards=[dict(file="shard-00000.array_record", records=0)])))
  with raises_config_error(r"holds no record \(rejected: \{'corrupt_image': 2\}\)"):
    sources.build_source(cfg)
  with raises_config_error("data.crop must be one of"):
    arrayrecord.ArrayRecordSource(str(tmp_path), 16, crop="zoom")


def test_dp_training_on_converted_array_records(converted, tmp_path, web_config):
  config = web_config("array_record", converted["out"], 114)
  entry = train.run(config, str(tmp_path), log=lambda *_: None)
  assert entry["steps_done"] == 4 and entry["dataset_size"] == 114
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  diagnostics = rows[-1]["private_data_diagnostics"]
  assert diagnostics["skipped"] == {} and diagnostics["examples"] > 0  # bad ones converted out
  config.data.size = 120
  with pytest.raises(config_lib.ConfigError, match="114"):
    train.run(config, str(tmp_path / "wrong_size"), log=lambda *_: None)
