"""Evaluation configs shared by the demo configs."""

import ml_collections


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
