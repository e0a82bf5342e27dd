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

File sources decode images to `data.image_size` with `data.crop` ("center" or
"random_resized", seeded by (data.seed, index)). See docs/data.md.
"""

from dpvl.data import procedural
from dpvl.data import synthetic


def _field(cfg, name, default=None):
  return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def _required(cfg, name):
  value = _field(cfg, name)
  if not value:
    raise ValueError(f"data.{name} is required for data.source={cfg.source!r}.")
  return value


def _shape_scenes(cfg):
  return synthetic.ShapeScenes(num_records=cfg.size, image_size=cfg.image_size, seed=cfg.seed,
                               max_objects=getattr(cfg, "max_objects", 2))


def _procedural(cfg):
  return procedural.ProceduralImages(num_records=cfg.size, image_size=cfg.image_size,
                                     seed=cfg.seed)


def _webdataset(cfg):
  from dpvl.data import webdataset  # pylint: disable=g-import-not-at-top
  return webdataset.WebDatasetSource(_required(cfg, "path"), cfg.image_size,
                                     _field(cfg, "crop", "center"), _field(cfg, "seed", 0),
                                     _field(cfg, "index_cache") or None)


def _array_record(cfg):
  from dpvl.data import arrayrecord  # pylint: disable=g-import-not-at-top
  return arrayrecord.ArrayRecordSource(_required(cfg, "path"), cfg.image_size,
                                       _field(cfg, "crop", "center"), _field(cfg, "seed", 0))


def _tfds(cfg):
  from dpvl.data import tfds  # pylint: disable=g-import-not-at-top
  return tfds.TfdsSource(_required(cfg, "name"), _field(cfg, "split", "train"), cfg.image_size,
                         _field(cfg, "data_dir"), _field(cfg, "manual_dir"))


REGISTRY = {
    "shape_scenes": _shape_scenes,
    "procedural": _procedural,  # synthetic warm-start images, no captions or labels
    "webdataset": _webdataset,
    "array_record": _array_record,
    "tfds": _tfds,
}

# Sources whose records are generated, never read: a non-private run on them touches no private
# data, so it may seed a private one (dpvl/privacy/provenance.py). Any other source must be
# declared public in the seeding run's config (`data.public = True`).
PUBLIC_BY_CONSTRUCTION = frozenset({"shape_scenes", "procedural"})


def build_source(cfg):
  """The source named by `cfg.source`, built from the rest of `cfg` (config.data)."""
  if cfg.source not in REGISTRY:
    raise ValueError(
        f"data.source={cfg.source!r} is unknown; choose one of {sorted(REGISTRY)}.")
  return REGISTRY[cfg.source](cfg)
