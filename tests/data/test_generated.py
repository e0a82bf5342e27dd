"""The generated sources check their arguments, naming the config.data field of each."""

import pytest

from dpvl import config as config_lib
from dpvl.data import procedural_images
from dpvl.data import shape_scenes


def _raises(match):
  return pytest.raises(config_lib.ConfigError, match=match)


def test_generated_sources_check_their_arguments():
  with _raises("num_records"):
    procedural_images.ProceduralImages(num_records=0, image_size=8, seed=0)
  with _raises("max_objects"):
    shape_scenes.ShapeScenes(5, 8, seed=0, max_objects=10)
