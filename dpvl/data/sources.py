"""Data sources by name (`config.data.source`): random-access, grain-compatible.

A source is anything with `__len__` and `__getitem__(index) -> record dict` (grain's
`RandomAccessDataSource` protocol). To add one, register a builder taking `config.data`.

* `shape_scenes`, `procedural`: generated (the demos; nothing stored or downloaded).
* `webdataset`: tar shards as img2dataset writes them (`data.path`: glob, `{000..099}` ranges
  or comma-separated local paths/URLs), indexed when opened (`data.index_cache`: optional
  directory for the shard indices).
* `array_record`: a directory written by `python -m dpvl.data.convert` (`data.path`).
* `tfds`: a prepared TFDS dataset, labelled (`data.name`, `data.split`, `data.data_dir`,
  `data.manual_dir`), for probes; needs tensorflow-datasets.

File sources decode images to `data.image_size` with `data.crop`: "center", or
"random_resized" (the whole image: the loader crops it afresh at every draw,
`loader.augmentation`). See docs/data.md.
"""

from dpvl import config as config_lib
from dpvl import registry
from dpvl.data import procedural_images
from dpvl.data import shape_scenes


def _option(cfg, name, default=None):
  """`cfg.<name>` of a data config (a ConfigDict, dict or namespace), or `default`."""
  return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def _given(cfg, name):
  """`cfg.<name>`; ConfigError naming the field if it is absent."""
  value = _option(cfg, name)
  if value is None:
    raise config_lib.ConfigError(f"data.{name} is required for data.source={cfg.source!r}.")
  return value


def _required(cfg, name):
  """`cfg.<name>`; ConfigError naming the field if it is absent or empty."""
  value = _option(cfg, name)
  if not value:
    raise config_lib.ConfigError(f"data.{name} is required for data.source={cfg.source!r}.")
  return value


def _shape_scenes(cfg):
  return shape_scenes.ShapeScenes(num_records=_given(cfg, "size"),
                                  image_size=_given(cfg, "image_size"),
                                  seed=_given(cfg, "seed"),
                                  max_objects=_option(cfg, "max_objects", 2))


def _procedural(cfg):
  return procedural_images.ProceduralImages(num_records=_given(cfg, "size"),
                                            image_size=_given(cfg, "image_size"),
                                            seed=_given(cfg, "seed"))


def _webdataset(cfg):
  from dpvl.data import webdataset  # pylint: disable=g-import-not-at-top
  return webdataset.WebDatasetSource(_required(cfg, "path"), _given(cfg, "image_size"),
                                     _option(cfg, "crop", "center"),
                                     _option(cfg, "index_cache") or None)


def _array_record(cfg):
  from dpvl.data import arrayrecord  # pylint: disable=g-import-not-at-top
  return arrayrecord.ArrayRecordSource(_required(cfg, "path"), _given(cfg, "image_size"),
                                       _option(cfg, "crop", "center"))


def _tfds(cfg):
  from dpvl.data import tfds  # pylint: disable=g-import-not-at-top
  return tfds.TfdsSource(_required(cfg, "name"), _option(cfg, "split", "train"),
                         _given(cfg, "image_size"),
                         _option(cfg, "data_dir"), _option(cfg, "manual_dir"))


# Builders: config.data -> source. Fields are named relative to the data config, which may also
# sit under an evaluator's config (`config.evals.<name>.data`).
REGISTRY = registry.Registry("data.source", {
    "shape_scenes": _shape_scenes,
    "procedural": _procedural,  # synthetic warm-start images, no captions or labels
    "webdataset": _webdataset,
    "array_record": _array_record,
    "tfds": _tfds,
})

# Sources whose records are generated, never read: a non-private run on them touches no private
# data, so it may seed a private one (dpvl/privacy/provenance.py). Any other source must be
# declared public in the seeding run's config (`data.public = True`).
PUBLIC_BY_CONSTRUCTION = frozenset({"shape_scenes", "procedural"})


def build_source(cfg):
  """The source named by `cfg.source`, built from the rest of `cfg` (config.data).

  Args:
    cfg: config.data (a ConfigDict, or any object with the fields as attributes).

  Returns:
    The source; ConfigError naming the field (relative to `cfg`) for a bad field or path.
  """
  return REGISTRY[cfg.source](cfg)
