"""Sources by name (data.source) and every bad data field named in a ConfigError."""

import types

import ml_collections
import pytest

from dpvl.data import sources
from tests.helpers import data_config
from tests.helpers import raises_config_error


@pytest.mark.parametrize("cfg, match", [
    (dict(source="array_record", image_size=16), r"data.path is required.*array_record"),
    (dict(source="webdataset", path="", image_size=16), r"data.path is required.*webdataset"),
    (dict(source="tfds", image_size=16), r"data.name is required.*tfds"),
    (dict(source="shape_scenes", image_size=16, seed=0), r"data.size is required"),
    (dict(source="procedural", size=5, seed=0), r"data.image_size is required"),
    (dict(source="shape_scenes", size=0, image_size=16, seed=0), r"num_records \(data.size\)"),
    (dict(source="procedural", size=5, image_size=0, seed=0), r"\(data.image_size\)"),
    (dict(source="shape_scenes", size=5, image_size=16, seed=-1), r"\(data.seed\) must be non-"),
    (dict(source="shape_scenes", size=5, image_size=16, seed=0, max_objects=0),
     r"max_objects \(data.max_objects\) must be in \[1, 9\]"),
])
def test_data_fields(cfg, match):
  with raises_config_error(match):
    sources.build_source(data_config(**cfg))


def test_sources_by_name():
  cfg = ml_collections.ConfigDict(dict(source="shape_scenes", size=10, image_size=16, seed=2,
                                       max_objects=1))
  source = sources.build_source(cfg)
  assert len(source) == 10 and source[0]["image"].shape == (16, 16, 3)
  assert ", " not in "".join(source[i]["caption"] for i in range(10))  # one object each
  plain = sources.build_source(types.SimpleNamespace(source="shape_scenes", size=10,
                                                     image_size=16, seed=2))
  assert repr(plain) == "ShapeScenes(num_records=10, image_size=16, seed=2, max_objects=2)"
  with pytest.raises(ValueError, match=r"data.source.*shape_scenes"):
    sources.build_source(types.SimpleNamespace(source="laion"))
