"""Generated image-caption data: scenes of coloured shapes and captions that describe them.

Record i of `ShapeScenes(n, image_size, seed)` is a pure function of (seed, i), so the source
has any size without materialising anything, and the demo and tests need no download.

A scene is a plain or softly tinted dark background with 1..max_objects shapes, each with a
shape, a colour, a size and one of nine grid positions. Objects are placed so that their
bounding boxes do not overlap when such a placement is found in a few draws (always, for two
objects); a small jitter may make neighbours touch. Captions are short and lowercase, e.g.
"a large red circle top left, a small blue square in the centre".
"""

import dataclasses

import numpy as np

from dpvl import config as config_lib
from dpvl.data import generated

SHAPES = ("circle", "square", "triangle", "cross", "ring")  # index = label
num_classes = len(SHAPES)
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
# Half-extent of a shape's bounding box, as a fraction of the image side.
SIZES = {"small": 0.1, "large": 0.19}
# Named positions: (row, column) centres as fractions of the image side, on a 3 x 3 grid.
POSITIONS = {
    "top left": (0.2, 0.2), "top": (0.2, 0.5), "top right": (0.2, 0.8),
    "left": (0.5, 0.2), "centre": (0.5, 0.5), "right": (0.5, 0.8),
    "bottom left": (0.8, 0.2), "bottom": (0.8, 0.5), "bottom right": (0.8, 0.8),
}
_PHRASES = {p: "in the centre" if p == "centre" else p for p in POSITIONS}
_COLOUR_NAMES = tuple(COLOURS)
_SIZE_NAMES = tuple(SIZES)
_POSITION_NAMES = tuple(POSITIONS)
_CENTRES = np.array(list(POSITIONS.values()))
_JITTER = 0.02        # max shift of a centre, as a fraction of the image side
_PLACEMENT_TRIES = 16


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  colour: str
  size: str
  position: str
  offset: tuple[float, float] = (0.0, 0.0)  # jitter of the centre (row, column)


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[SceneObject, ...]
  background: tuple[int, int, int]


def _place(rng: np.random.Generator, half_extents: np.ndarray) -> np.ndarray:
  """Distinct grid positions whose bounding boxes do not overlap (the last draw if none does)."""
  n = len(half_extents)
  need = half_extents[:, None] + half_extents[None, :]
  for _ in range(_PLACEMENT_TRIES):
    chosen = rng.choice(len(_CENTRES), size=n, replace=False)
    centres = _CENTRES[chosen]
    gap = np.abs(centres[:, None] - centres[None, :]).max(-1)  # Chebyshev distance
    if np.all((gap >= need - 1e-9) | np.eye(n, dtype=bool)):
      break
  return chosen


def scene_spec(seed: int, index: int, max_objects: int = 2) -> Scene:
  """The scene of record `index`: the generator's ground truth, a pure function of its args.

  Args:
    seed: the generator's seed.
    index: the record's number.
    max_objects: the most objects a scene has, in [1, len(POSITIONS)]; the count is uniform
      in [1, max_objects].

  Returns:
    The `Scene`: its objects (distinct grid positions, jittered) and background colour.
  """
  rng = np.random.default_rng([seed, index])
  count = int(rng.integers(1, max_objects + 1))
  shapes = rng.integers(len(SHAPES), size=count)
  colours = rng.integers(len(_COLOUR_NAMES), size=count)
  sizes = rng.integers(len(_SIZE_NAMES), size=count)
  positions = _place(rng, np.array([SIZES[_SIZE_NAMES[s]] for s in sizes]))
  offsets = rng.uniform(-_JITTER, _JITTER, size=(count, 2))
  level = rng.integers(0, 60)
  tint = rng.integers(0, 30, size=3) * (rng.random() < 0.5)  # plain or softly coloured
  objects = tuple(
      SceneObject(SHAPES[sh], _COLOUR_NAMES[co], _SIZE_NAMES[si], _POSITION_NAMES[po],
                  (float(dy), float(dx)))
      for sh, co, si, po, (dy, dx) in zip(shapes, colours, sizes, positions, offsets))
  return Scene(objects, tuple(int(v) for v in level + tint))


def caption(objects) -> str:
  """E.g. 'a large red circle top left, a small blue square in the centre'."""
  return ", ".join(f"a {o.size} {o.colour} {o.shape} {_PHRASES[o.position]}" for o in objects)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
  """Mask of a shape with half-extent r on offsets (dy, dx) from its centre; within the box r."""
  if shape == "circle":
    return dy ** 2 + dx ** 2 <= r ** 2
  if shape == "square":
    return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
  if shape == "triangle":  # apex up
    return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
  if shape == "cross":
    arm = 0.3 * r
    return (((np.abs(dy) <= arm) & (np.abs(dx) <= r)) |
            ((np.abs(dx) <= arm) & (np.abs(dy) <= r)))
  if shape == "ring":
    d2 = dy ** 2 + dx ** 2
    return (d2 <= r ** 2) & (d2 >= (0.5 * r) ** 2)
  raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int) -> np.ndarray:
  """uint8 [S, S, 3] image of the scene; later objects are drawn on top."""
  grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
  y, x = grid[:, None], grid[None, :]
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = scene.background
  for obj in scene.objects:
    cy, cx = POSITIONS[obj.position]
    mask = _shape_mask(obj.shape, y - (cy + obj.offset[0]), x - (cx + obj.offset[1]),
                       SIZES[obj.size])
    image[mask] = COLOURS[obj.colour]
  return image


class ShapeScenes(generated.GeneratedSource):
  """Random-access source (grain `RandomAccessDataSource` protocol) of captioned scenes.

  Records: `image` uint8 [S, S, 3], `caption` str, `index`, and the first object's attributes
  as class indices, for linear probes: `label` (shape, into `SHAPES`), `colour_label`,
  `size_label` and `position_label` (into `COLOURS`, `SIZES`, `POSITIONS`).
  """

  def __init__(self, num_records: int, image_size: int = 32, seed: int = 0,
               max_objects: int = 2):
    super().__init__(num_records, image_size, seed)
    if not 1 <= max_objects <= len(POSITIONS):
      raise config_lib.ConfigError(f"max_objects (data.max_objects) must be in "
                                   f"[1, {len(POSITIONS)}], got {max_objects}.")
    self._max_objects = int(max_objects)

  def record(self, index: int) -> dict:
    scene = scene_spec(self._seed, index, self._max_objects)
    first = scene.objects[0]
    return dict(image=render(scene, self._size), caption=caption(scene.objects), index=index,
                label=SHAPES.index(first.shape), colour_label=_COLOUR_NAMES.index(first.colour),
                size_label=_SIZE_NAMES.index(first.size),
                position_label=_POSITION_NAMES.index(first.position))

  def __repr__(self) -> str:
    return super().__repr__()[:-1] + f", max_objects={self._max_objects})"
