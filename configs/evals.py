"""Evaluation configs shared by the demo configs."""

import ml_collections

from dpvl.data import shape_scenes


def scene_probe(label_key: str, blocks: int, every: int = 0, train_size: int = 2_000,
                test_size: int = 1_000, image_size: int = 32) -> ml_collections.ConfigDict:
  """Linear probe on one attribute of generated one-object scenes: `label` (the shape),
  `colour_label`, `size_label` or `position_label`.

  The probe's scenes use their own seed: public evaluation data, not the private records.
  """
  return ml_collections.ConfigDict(dict(
      type="linear_probe", every=every, blocks=blocks, label_key=label_key,
      train_size=train_size, test_size=test_size, steps=500, batch_size=256,
      learning_rate=1e-2, weight_decay=1e-4,
      data=dict(source="shape_scenes", size=train_size + test_size, image_size=image_size,
                seed=1_000_003, max_objects=1)))


def _scene_data(size: int, image_size: int, max_objects: int = 1) -> dict:
  return dict(source="shape_scenes", size=size, image_size=image_size, seed=1_000_003,
              max_objects=max_objects)


def scene_zero_shot(attribute: str, size: int = 1_000, every: int = 0,
                    image_size: int = 32) -> ml_collections.ConfigDict:
  """Zero-shot classification of one-object scenes by `attribute` ("shape" or "colour"), with
  prompts in the captions' own grammar, ensembled over the other attributes (public
  evaluation scenes with their own seed)."""
  sizes, shapes = list(shape_scenes.SIZES), list(shape_scenes.SHAPES)
  colours = list(shape_scenes.COLOURS)
  if attribute == "shape":
    label_key, names = "label", shapes
    templates = [f"a {s} {c} {{}} in the centre" for s in sizes for c in colours]
  elif attribute == "colour":
    label_key, names = "colour_label", colours
    templates = [f"a {s} {{}} {sh} in the centre" for s in sizes for sh in shapes]
  else:
    raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}.")
  return ml_collections.ConfigDict(dict(
      type="zero_shot", every=every, label_key=label_key, class_names=names,
      templates=templates, size=size, data=_scene_data(size, image_size)))


def scene_retrieval(size: int = 1_000, every: int = 0, image_size: int = 32,
                    max_objects: int = 1) -> ml_collections.ConfigDict:
  """Image-text recall@1/5 on captioned scenes (public evaluation scenes, own seed)."""
  return ml_collections.ConfigDict(dict(
      type="retrieval", every=every, size=size, ks=(1, 5),
      data=_scene_data(size, image_size, max_objects)))
