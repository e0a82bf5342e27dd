"""Data sources by name (`config.data.source`): random-access, grain-compatible.

A source is anything with `__len__` and `__getitem__(index) -> record dict` (grain's
`RandomAccessDataSource` protocol). To add one, register a builder taking `config.data`.
"""

from dpvl.data import procedural
from dpvl.data import synthetic


def _shape_scenes(cfg):
  return synthetic.ShapeScenes(num_records=cfg.size, image_size=cfg.image_size, seed=cfg.seed,
                               max_objects=getattr(cfg, "max_objects", 2))


def _procedural(cfg):
  return procedural.ProceduralImages(num_records=cfg.size, image_size=cfg.image_size,
                                     seed=cfg.seed)


REGISTRY = {
    "shape_scenes": _shape_scenes,
    "procedural": _procedural,  # synthetic warm-start images, no captions or labels
}


def build_source(cfg):
  """The source named by `cfg.source`, built from the rest of `cfg` (config.data)."""
  if cfg.source not in REGISTRY:
    raise ValueError(
        f"data.source={cfg.source!r} is unknown; choose one of {sorted(REGISTRY)}.")
  return REGISTRY[cfg.source](cfg)
