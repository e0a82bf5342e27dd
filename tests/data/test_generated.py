"""The generated sources check their arguments, naming the config.data field of each."""


from dpvl.data import procedural_images
from dpvl.data import shape_scenes
from tests.helpers import raises_config_error


def test_generated_sources_check_their_arguments():
  with raises_config_error("num_records"):
    procedural_images.ProceduralImages(num_records=0, image_size=8, seed=0)
  with raises_config_error("max_objects"):
    shape_scenes.ShapeScenes(5, 8, seed=0, max_objects=10)
