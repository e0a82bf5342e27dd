"""Generated scenes: deterministic per seed and index, captions that describe the objects."""

import collections
import pickle

import grain
import numpy as np
import pytest

from dpvl.data import shape_scenes


def test_scenes_are_deterministic_per_seed_and_index():
  a, b = shape_scenes.ShapeScenes(100, 32, seed=0), shape_scenes.ShapeScenes(100, 32, seed=0)
  c = shape_scenes.ShapeScenes(100, 32, seed=1)
  np.testing.assert_array_equal(a[7]["image"], b[7]["image"])
  assert a[7]["caption"] == b[7]["caption"] and a[7]["label"] == b[7]["label"]
  np.testing.assert_array_equal(a[np.int64(7)]["image"], a[7]["image"])
  assert any(a[i]["caption"] != c[i]["caption"] for i in range(10))
  assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(10))
  r = a[3]
  assert set(r) == {"image", "caption", "label", "index", "colour_label", "size_label",
                    "position_label"}
  assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
  assert isinstance(r["caption"], str) and r["caption"] == r["caption"].lower()
  assert isinstance(r["label"], int) and r["index"] == 3
  assert len(a) == 100
  assert repr(a) == "ShapeScenes(num_records=100, image_size=32, seed=0, max_objects=2)"
  for bad in (100, -1):
    with pytest.raises(IndexError):
      a[bad]  # pylint: disable=pointless-statement


def test_scenes_work_as_a_grain_source():
  scenes = shape_scenes.ShapeScenes(20, 16, seed=3)
  assert isinstance(scenes, grain.sources.RandomAccessDataSource)
  dataset = grain.MapDataset.source(scenes).seed(0).shuffle()
  assert sorted(dataset[i]["index"] for i in range(20)) == list(range(20))
  copy = pickle.loads(pickle.dumps(scenes))  # grain's worker processes pickle the source
  assert copy[5]["caption"] == scenes[5]["caption"]


@pytest.mark.parametrize("kwargs", [dict(num_records=0), dict(num_records=5, image_size=0),
                                    dict(num_records=5, seed=-1),
                                    dict(num_records=5, max_objects=0),
                                    dict(num_records=5, max_objects=10)])
def test_scene_arguments_are_checked(kwargs):
  with pytest.raises(ValueError):
    shape_scenes.ShapeScenes(**kwargs)


def test_captions_describe_the_objects():
  scenes = shape_scenes.ShapeScenes(10**9, 32, seed=5, max_objects=2)  # any size, nothing stored
  counts = collections.Counter()
  for i in range(0, 10**9, 10**7):
    objects = shape_scenes.scene_spec(5, i, 2).objects
    counts[len(objects)] += 1
    record = scenes[i]
    described = record["caption"].split(", ")
    assert len(described) == len(objects)
    for o, text in zip(objects, described):
      assert text.startswith(f"a {o.size} {o.colour} {o.shape} ") and text.endswith(o.position)
    assert record["label"] == shape_scenes.SHAPES.index(objects[0].shape)
  assert set(counts) == {1, 2}


def test_two_object_captions_mostly_fit_64_bytes():
  scenes = shape_scenes.ShapeScenes(1_000, 8, seed=0, max_objects=2)
  lengths = np.array([len(scenes[i]["caption"].encode()) for i in range(1_000)])
  assert np.mean(lengths + 2 <= 64) > 0.8  # + BOS and EOS
  single = shape_scenes.ShapeScenes(1_000, 8, seed=0, max_objects=1)
  assert max(len(single[i]["caption"]) for i in range(1_000)) + 2 <= 48


def test_objects_are_drawn_in_their_colour_and_do_not_overlap():
  scenes = shape_scenes.ShapeScenes(50, 32, seed=0, max_objects=2)
  for i in range(50):
    scene = shape_scenes.scene_spec(0, i, 2)
    image = scenes[i]["image"]
    assert np.all(image[0, 0] == scene.background)  # the corner is never covered
    for o in scene.objects:
      colour = np.array(shape_scenes.COLOURS[o.colour])
      assert np.all(image.reshape(-1, 3) == colour, axis=1).sum() >= 4
    if len(scene.objects) == 2:  # the bounding boxes (before jitter) are apart
      (y0, x0), (y1, x1) = (shape_scenes.POSITIONS[o.position] for o in scene.objects)
      r0, r1 = (shape_scenes.SIZES[o.size] for o in scene.objects)
      assert max(abs(y0 - y1), abs(x0 - x1)) >= r0 + r1 - 1e-9


def test_labels_are_balanced():
  scenes = shape_scenes.ShapeScenes(2_000, 8, seed=0)
  labels = [scenes[i]["label"] for i in range(2_000)]
  counts = collections.Counter(labels)
  assert set(counts) == set(range(shape_scenes.num_classes)) == set(range(len(shape_scenes.SHAPES)))
  assert min(counts.values()) > 2_000 / shape_scenes.num_classes * 0.75
  # The other attribute labels name the first object's attributes, as the caption does.
  for i in range(20):
    r = scenes[i]
    first = r["caption"].split(",")[0].split()
    assert first[1] == tuple(shape_scenes.SIZES)[r["size_label"]]
    assert first[2] == tuple(shape_scenes.COLOURS)[r["colour_label"]]
    assert first[3] == shape_scenes.SHAPES[r["label"]]
    position = tuple(shape_scenes.POSITIONS)[r["position_label"]]
    assert r["caption"].split(",")[0].endswith(
        "in the centre" if position == "centre" else position)
