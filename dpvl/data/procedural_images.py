"""Procedural synthetic images for a non-private warm start, in the spirit of Shaders21k.

Each image is a small random "shader" evaluated on a pixel grid: a few layers of oriented
sinusoidal gratings, radial waves, domain-warped noise-like patterns and hard-edged shapes,
mixed through random colour palettes. No real data is involved, so pretraining on these costs no
privacy. Record i is a pure function of (seed, i); any number of images, nothing stored.
"""

import numpy as np

from dpvl.data import generated

PATTERNS = ("grating", "radial", "warp", "checker", "blobs")


def _palette(rng: np.random.Generator):
  """A cosine colour palette t -> rgb in [0, 1] (a, b, c, d of a + b cos(2 pi (c t + d)))."""
  a, b = rng.uniform(0.3, 0.7, 3), rng.uniform(0.2, 0.5, 3)
  c, d = rng.uniform(0.5, 2.0, 3), rng.uniform(0.0, 1.0, 3)
  return lambda t: np.clip(a + b * np.cos(2 * np.pi * (c * t[..., None] + d)), 0.0, 1.0)


def _scalar_field(pattern: str, rng: np.random.Generator, y: np.ndarray,
                  x: np.ndarray) -> np.ndarray:
  """A scalar field in [0, 1] on the grid (y, x in [-1, 1])."""
  freq = rng.uniform(1.0, 12.0)
  if pattern == "grating":
    theta = rng.uniform(0, np.pi)
    return 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * x + np.sin(theta) * y) * np.pi)
  if pattern == "radial":
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    return 0.5 + 0.5 * np.cos(freq * r * np.pi + rng.uniform(0, 2 * np.pi))
  if pattern == "warp":
    k1, k2 = rng.uniform(1.0, 5.0, 2)
    wy = y + 0.5 * np.sin(k1 * np.pi * x + rng.uniform(0, 6))
    wx = x + 0.5 * np.cos(k2 * np.pi * y + rng.uniform(0, 6))
    return 0.5 + 0.5 * np.sin(freq * np.pi * wy) * np.cos(freq * np.pi * wx)
  if pattern == "checker":
    theta = rng.uniform(0, np.pi)
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    return ((np.floor(freq * u) + np.floor(freq * v)) % 2).astype(np.float32)
  if pattern == "blobs":
    n = int(rng.integers(2, 7))
    centres, widths = rng.uniform(-1, 1, (n, 2)), rng.uniform(0.05, 0.4, n)
    d = (y[None] - centres[:, 0, None, None]) ** 2 + (x[None] - centres[:, 1, None, None]) ** 2
    return np.clip(np.sum(np.exp(-d / widths[:, None, None] ** 2), axis=0), 0.0, 1.0)
  raise ValueError(f"unknown pattern {pattern!r}")


def render(seed: int, index: int, image_size: int) -> np.ndarray:
  """uint8 [S, S, 3] image number `index` of the generator seeded with `seed`.

  Args:
    seed: the generator's seed.
    index: the image's number; any int >= 0.
    image_size: S, the side in pixels.

  Returns:
    uint8 [image_size, image_size, 3], a pure function of (seed, index, image_size).
  """
  rng = np.random.default_rng([seed, index, 0x5EAD])
  grid = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
  y, x = np.meshgrid(grid, grid, indexing="ij")
  image = np.zeros((image_size, image_size, 3), np.float32)
  weights = rng.dirichlet(np.ones(int(rng.integers(1, 4))))
  for w in weights:
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    image += w * _palette(rng)(_scalar_field(pattern, rng, y, x))
  if rng.random() < 0.5:  # a hard-edged shape on top
    cy, cx, r = *rng.uniform(-0.6, 0.6, 2), rng.uniform(0.15, 0.5)
    mask = (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r) if rng.random() < 0.5 else (
        (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2)
    image[mask] = _palette(rng)(np.full(int(mask.sum()), rng.random(), np.float32))
  return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


class ProceduralImages(generated.GeneratedSource):
  """Random-access source (grain protocol) of procedural images: records {image, index}."""

  def __init__(self, num_records: int, image_size: int = 32, seed: int = 0):
    super().__init__(num_records, image_size, seed)

  def record(self, index: int) -> dict:
    return dict(image=render(self._seed, index, self._size), index=index)
