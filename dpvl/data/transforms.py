"""Host-side example transforms with fixed public constants (nothing is fit on private data):
image decoding, crops, per-draw augmentation, normalisation, caption cleaning."""

import dataclasses
import io
import math
import re
import unicodedata

import numpy as np
from PIL import Image

from dpvl.data import errors

# (mean, std) per channel on [0, 1] pixels, by `config.data.normalization`: "half" maps
# [0, 255] to [-1, 1]; "imagenet" is torchvision's ImageNet statistics (ViP, DP-Cap).
NORMALIZATIONS = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def check_normalization(name: str) -> str:
  if name not in NORMALIZATIONS:
    raise ValueError(f"data.normalization must be one of {sorted(NORMALIZATIONS)}, got "
                     f"{name!r}.")
  return name


def normalize_image(image: np.ndarray, normalization: str = "half") -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32, (pixel / 255 - mean) / std per channel."""
  image = np.asarray(image)
  if image.ndim < 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}.")
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}.")
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[check_normalization(
      normalization)])
  return (image.astype(np.float32) / 255.0 - mean) / std


def model_image(image: np.ndarray, size: int, normalization: str = "half") -> np.ndarray:
  """A record's uint8 image as a model input: normalised, checked to be [size, size, 3]."""
  image = normalize_image(image, normalization)
  if image.shape != (size, size, 3):
    raise ValueError(f"expected a [{size}, {size}, 3] image (config.data.image_size), got "
                     f"shape {image.shape}.")
  return image


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side to `size` (bicubic), centre crop."""
  image = np.asarray(image)
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return resized[top:top + size, left:left + size]


def resize_shorter_side(image: np.ndarray, low: int, high: int) -> np.ndarray:
  """uint8 [H, W, 3] with its shorter side brought into [low, high] (bicubic; aspect kept)."""
  image = np.asarray(image)
  short = min(image.shape[:2])
  if low <= short <= high:
    return image
  scale = (low if short < low else high) / short
  h, w = image.shape[:2]
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def decode_image(data: bytes, min_size: int | None = None) -> np.ndarray:
  """JPEG/PNG/WebP bytes -> uint8 [H, W, 3] (RGB); raises BadRecord(corrupt_image).

  With `min_size`, a JPEG is decoded at the smallest DCT scale whose shorter side is still at
  least `min_size` (much faster for large images; the pixels a resize to `min_size` needs).
  A truncated file is an error, never a half-grey image.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      if min_size and im.format == "JPEG":
        w, h = im.size
        scale = min_size / max(1, min(w, h))
        im.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
      image = np.asarray(im.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise errors.BadRecord(errors.CORRUPT_IMAGE, f"{type(e).__name__}: {e}"[:100]) from None
  if image.ndim != 3 or min(image.shape[:2]) < 1:
    raise errors.BadRecord(errors.CORRUPT_IMAGE, f"shape {image.shape}")
  return image


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: a random box of `scale` of the area and aspect
  `ratio` (log-uniform), resized (bicubic); the centre crop if 10 draws find no box.

  The randomness comes from `rng` only (`Augmentation` seeds it by (seed, record, step)).

  Args:
    image: uint8 [H, W, 3].
    size: the side of the output in pixels.
    rng: the generator of the box (and nothing else).
    scale: (min, max) share of the image's area the box covers, drawn uniformly.
    ratio: (min, max) aspect ratio (width / height) of the box, drawn log-uniformly.

  Returns:
    uint8 [size, size, 3].
  """
  image = np.asarray(image)
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      box = image[top:top + ch, left:left + cw]
      return np.asarray(Image.fromarray(box).resize((size, size), Image.BICUBIC))
  return resize_center_crop(image, size)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """RandomResizedCrop (bicubic) and a horizontal flip, fresh at every draw of a record.

  The randomness of a draw is a function of (seed, record index, step) alone: a record's crop
  depends on no other record, and a resumed run replays the very same pixels.

  Attributes:
    size: the side of the output image.
    seed: the run's data seed (`config.data.seed`).
    scale: (min, max) share of the image's area the crop covers.
    flip: whether to flip left-right with probability 1/2.
  """

  size: int
  seed: int = 0
  scale: tuple[float, float] = (0.2, 1.0)
  flip: bool = True

  def __post_init__(self):
    low, high = self.scale
    if not 0 < low <= high <= 1:
      raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {self.scale}.")

  def __call__(self, image: np.ndarray, index: int, step: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: record `index`'s draw at `step`."""
    rng = np.random.default_rng([self.seed, int(index), int(step)])
    image = random_resized_crop(image, self.size, rng, scale=tuple(self.scale))
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return np.ascontiguousarray(image)


_SPACE = re.compile(r"\s+")


def clean_caption(raw) -> str:
  """Caption bytes or text -> NFC text, control characters dropped, whitespace collapsed.

  Raises BadRecord(non_utf8_caption) for bytes that are not UTF-8 and BadRecord(empty_caption)
  when nothing is left.
  """
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError:
      raise errors.BadRecord(errors.NON_UTF8_CAPTION) from None
  if not isinstance(raw, str):
    raise errors.BadRecord(errors.EMPTY_CAPTION, f"caption is {type(raw).__name__}")
  text = unicodedata.normalize("NFC", raw.removeprefix("\ufeff"))
  text = "".join(" " if c.isspace() else c for c in text
                 if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co"))
  text = _SPACE.sub(" ", text).strip()
  if not text:
    raise errors.BadRecord(errors.EMPTY_CAPTION)
  return text
