"""Generated image-caption data: scenes of coloured shapes and captions that describe them.

Record i of `ShapeScenes(n, image_size, seed)` is a pure function of (seed, i), so the source
has any size without materialising anything, and the demo and tests need no download.
"""

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring")
num_classes = len(SHAPES)
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SIZES = {"small": 0.14, "large": 0.25}  # radius as a fraction of the image side
_COLOUR_NAMES = tuple(COLOURS)
_SIZE_NAMES = tuple(SIZES)
# Named positions: (row, column) centres as fractions of the image side.
POSITIONS = {
    "top left": (0.27, 0.27), "top right": (0.27, 0.73), "bottom left": (0.73, 0.27),
    "bottom right": (0.73, 0.73), "centre": (0.5, 0.5), "top": (0.27, 0.5),
    "bottom": (0.73, 0.5), "left": (0.5, 0.27), "right": (0.5, 0.73),
}
_POSITION_NAMES = tuple(POSITIONS)


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  colour: str
  size: str
  position: str


def scene_spec(seed: int, index: int, max_objects: int = 2):
  """The objects and background of record `index` (the generator's ground truth)."""
  rng = np.random.default_rng([seed, index])
  count = int(rng.integers(1, max_objects + 1))
  positions = rng.choice(len(_POSITION_NAMES), size=count, replace=False)
  objects = [
      SceneObject(SHAPES[rng.integers(len(SHAPES))],
                  _COLOUR_NAMES[rng.integers(len(_COLOUR_NAMES))],
                  _SIZE_NAMES[rng.integers(len(_SIZE_NAMES))],
                  _POSITION_NAMES[p])
      for p in positions
  ]
  background = rng.integers(0, 70, size=3)
  jitter = rng.uniform(-0.04, 0.04, size=(count, 2))
  return objects, background, jitter


def _shape_mask(shape: str, dy, dx, r):
  """Boolean mask of a shape of radius r on offsets (dy, dx) from its centre."""
  if shape == "circle":
    return dy ** 2 + dx ** 2 <= r ** 2
  if shape == "square":
    return (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
  if shape == "triangle":
    return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
  if shape == "cross":
    arm = 0.3 * r
    return (((np.abs(dy) <= arm) & (np.abs(dx) <= r)) |
            ((np.abs(dx) <= arm) & (np.abs(dy) <= r)))
  if shape == "ring":
    d2 = dy ** 2 + dx ** 2
    return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
  raise ValueError(f"unknown shape {shape!r}")


def caption(objects) -> str:
  """'a large red circle at the top left and a small blue square at the bottom'."""
  parts = [f"a {o.size} {o.colour} {o.shape} "
           f"{'in the' if o.position == 'centre' else 'at the'} {o.position}"
           for o in objects]
  return " and ".join(parts)


def render(objects, background, jitter, image_size: int) -> np.ndarray:
  """uint8 [S, S, 3] image of the scene; later objects are drawn on top."""
  grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
  y, x = grid[:, None], grid[None, :]
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = background.astype(np.uint8)
  for obj, (jy, jx) in zip(objects, jitter):
    cy, cx = POSITIONS[obj.position]
    mask = _shape_mask(obj.shape, y - (cy + jy), x - (cx + jx), SIZES[obj.size])
    image[mask] = COLOURS[obj.colour]
  return image


class ShapeScenes:
  """Random-access source (grain `RandomAccessDataSource` protocol) of captioned scenes.

  Records: `image` uint8 [S, S, 3], `caption` str, `label` (the first object's shape class,
  for linear probes), `index`.
  """

  def __init__(self, num_records: int, image_size: int = 32, seed: int = 0,
               max_objects: int = 2):
    if num_records < 1:
      raise ValueError(f"num_records must be positive, got {num_records}.")
    self._n = int(num_records)
    self._size = int(image_size)
    self._seed = int(seed)
    self._max_objects = int(max_objects)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"index {index} out of range for {self._n} records.")
    objects, background, jitter = scene_spec(self._seed, index, self._max_objects)
    return dict(image=render(objects, background, jitter, self._size),
                caption=caption(objects), label=SHAPES.index(objects[0].shape), index=index)

  def __repr__(self) -> str:
    return (f"ShapeScenes(num_records={self._n}, image_size={self._size}, seed={self._seed}, "
            f"max_objects={self._max_objects})")
