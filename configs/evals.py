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
  label_key, names, templates = _scene_prompts(attribute)
  return ml_collections.ConfigDict(dict(
      type="zero_shot", every=every, label_key=label_key, class_names=names,
      templates=templates, size=size, data=_scene_data(size, image_size)))


def _scene_prompts(attribute: str) -> tuple[str, list[str], list[str]]:
  """(label_key, class names, templates) of one-object scenes classified by `attribute`."""
  sizes, shapes = list(shape_scenes.SIZES), list(shape_scenes.SHAPES)
  colours = list(shape_scenes.COLOURS)
  if attribute == "shape":
    return "label", shapes, [f"a {s} {c} {{}} in the centre" for s in sizes for c in colours]
  if attribute == "colour":
    return "colour_label", colours, [f"a {s} {{}} {sh} in the centre" for s in sizes
                                     for sh in shapes]
  raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}.")


def scene_retrieval(size: int = 1_000, every: int = 0, image_size: int = 32,
                    max_objects: int = 1) -> ml_collections.ConfigDict:
  """Image-text recall@1/5 on captioned scenes (public evaluation scenes, own seed)."""
  return ml_collections.ConfigDict(dict(
      type="retrieval", every=every, size=size, ks=(1, 5),
      data=_scene_data(size, image_size, max_objects)))


def scene_few_shot(label_key: str, blocks: int, every: int = 0, shots=(1, 2, 5, 10),
                   seeds: int = 3, train_size: int = 500, test_size: int = 1_000,
                   image_size: int = 32) -> ml_collections.ConfigDict:
  """Few-shot classification of one-object scenes by `label_key` (as `scene_probe`): shots
  drawn from the first `train_size` scenes, tested on the next `test_size`."""
  return ml_collections.ConfigDict(dict(
      type="few_shot", every=every, blocks=blocks, label_key=label_key, shots=shots,
      seeds=seeds, l2=1e-3, steps=100, train_size=train_size, test_size=test_size,
      data=_scene_data(train_size + test_size, image_size)))


def scene_caption_zero_shot(attribute: str = "shape", size: int = 1_000, every: int = 0,
                            image_size: int = 32) -> ml_collections.ConfigDict:
  """A captioner's zero-shot classification of one-object scenes by `attribute` ("shape" or
  "colour"): the prompts of `scene_zero_shot`, scored by the caption loss (DP-Cap only)."""
  label_key, names, templates = _scene_prompts(attribute)
  return ml_collections.ConfigDict(dict(
      type="caption_zero_shot", every=every, label_key=label_key, class_names=names,
      templates=templates, size=size, batch_size=128, data=_scene_data(size, image_size)))


def scene_caption_samples(count: int = 8, every: int = 0, image_size: int = 32,
                          max_objects: int = 2) -> ml_collections.ConfigDict:
  """Greedy captions of `count` evaluation scenes beside their true captions (DP-Cap only),
  written to WORKDIR/evals/step_<step>.json."""
  return ml_collections.ConfigDict(dict(
      type="caption_samples", every=every, count=count,
      data=_scene_data(count, image_size, max_objects)))


def _tfds_data(split: str, data_dir: str | None, manual_dir: str | None,
               image_size: int) -> dict:
  # String fields even when unset, so that --config.evals.<name>.data.data_dir=DIR works.
  text = lambda value: ml_collections.FieldReference(value, field_type=str)
  return dict(source="tfds", name="imagenet2012", split=split, image_size=image_size,
              data_dir=text(data_dir), manual_dir=text(manual_dir))


def imagenet_few_shot(blocks: int, data_dir: str | None = None, manual_dir: str | None = None,
                      image_size: int = 224, shots=(1, 2, 5, 10), seeds: int = 3,
                      train_size: int = 30_000, test_size: int = 10_000,
                      every: int = 0) -> ml_collections.ConfigDict:
  """ImageNet-1k few-shot accuracy (ViP, DP-Cap): shots drawn from the first `train_size`
  records of the prepared TFDS `imagenet2012` train split (every class needs max(shots)
  there), tested on the first `test_size` validation images.

  The dataset is never downloaded: prepare it in `data_dir` (or give the archives in
  `manual_dir`), see dpvl/data/tfds.py. The pool and test images are held in memory as
  uint8 (S * S * 3 bytes each: 150 kB at 224), only the drawn ones after loading.
  """
  return ml_collections.ConfigDict(dict(
      type="few_shot", every=every, blocks=blocks, label_key="label", num_classes=1000,
      shots=shots, seeds=seeds, l2=1e-3, steps=100, train_size=train_size,
      test_size=test_size, data=_tfds_data("train", data_dir, manual_dir, image_size),
      test_data=_tfds_data("validation", data_dir, manual_dir, image_size)))


def imagenet_linear_probe(blocks: int, data_dir: str | None = None,
                          manual_dir: str | None = None, image_size: int = 224,
                          epochs: int = 90, batch_size: int = 16_384,
                          base_learning_rate: float = 0.1, warmup_epochs: int = 10,
                          optimizer: str = "lars", feature_dtype: str = "float16",
                          feature_cache_dir: str | None = None, crop_fraction: float = 0.875,
                          every: int = 0) -> ml_collections.ConfigDict:
  """ImageNet-1k linear probe as MAE, ViP and DP-Cap run it (`streamed_linear_probe`): a
  non-affine BatchNorm + linear head on frozen features of the whole prepared TFDS
  `imagenet2012` train split, trained by LARS (momentum 0.9, no weight decay, lr =
  base_learning_rate * batch_size / 256, `warmup_epochs` then cosine), top-1/top-5 on the
  validation split. `blocks`: 12 for ViP's pooled last blocks of a ViT-B, 0 for the last layer.

  Records are decoded at image_size / crop_fraction (256 for 224) and centre-cropped to the
  encoder's size: MAE's evaluation transform. Features go to disk (`feature_cache_dir`, default
  the system's temporary directory): 1.28M x 768 * max(blocks, 1) x 2 bytes in float16 (23.6
  GB for 12 blocks), deleted after each evaluation. Nothing is downloaded (see
  `imagenet_few_shot`). `optimizer="sgd"`: SGD with the same momentum and schedule.
  """
  decode = round(image_size / crop_fraction)
  return ml_collections.ConfigDict(dict(
      type="streamed_linear_probe", every=every, blocks=blocks, label_key="label",
      num_classes=1000, epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size,
      base_learning_rate=base_learning_rate, optimizer=optimizer, momentum=0.9,
      weight_decay=0.0, bn_eps=1e-6, crop_fraction=crop_fraction, encode_batch=256, workers=16,
      feature_dtype=feature_dtype, keep_features=False,
      # A placeholder, not None, so that --config.evals.<name>.feature_cache_dir=DIR works.
      feature_cache_dir=ml_collections.FieldReference(feature_cache_dir, field_type=str),
      data=_tfds_data("train", data_dir, manual_dir, decode),
      test_data=_tfds_data("validation", data_dir, manual_dir, decode)))


def imagenet_caption_zero_shot(class_names, templates=("this is a photo of a {}",),
                               data_dir: str | None = None, manual_dir: str | None = None,
                               image_size: int = 224, size: int = 10_000, every: int = 0,
                               batch_size: int = 512) -> ml_collections.ConfigDict:
  """A captioner's ImageNet-1k zero-shot top-1/top-5 on the first `size` validation images
  of the prepared TFDS `imagenet2012` (never downloaded; see `imagenet_few_shot`).

  `class_names`: the 1,000 names in label order (e.g. CLIP's curated ImageNet names), given
  by the user; `templates`: prompts with '{}' for the name, averaged per class. Each image
  costs len(class_names) * len(templates) decoder passes.
  """
  return ml_collections.ConfigDict(dict(
      type="caption_zero_shot", every=every, label_key="label", class_names=list(class_names),
      templates=list(templates), size=size, batch_size=batch_size,
      data=_tfds_data("validation", data_dir, manual_dir, image_size)))


def caption_order(path: str, every: int = 0,
                  batch_size: int = 512) -> ml_collections.ConfigDict:
  """ARO-style caption-order accuracy (VG-Relation, VG-Attribution, COCO-Order,
  Flickr-Order) on a JSON file of items converted as docs/vip_and_evals.md describes."""
  return ml_collections.ConfigDict(dict(type="caption_order", every=every, path=path,
                                        batch_size=batch_size))


def imagenet_caption_samples(count: int = 16, every: int = 500, data_dir: str | None = None,
                             manual_dir: str | None = None,
                             image_size: int = 224) -> ml_collections.ConfigDict:
  """Greedy captions of the first `count` ImageNet-1k validation images (DP-Cap only; the
  records have no caption to compare with), written to WORKDIR/evals/step_<step>.json."""
  return ml_collections.ConfigDict(dict(
      type="caption_samples", every=every, count=count,
      data=_tfds_data("validation", data_dir, manual_dir, image_size)))
