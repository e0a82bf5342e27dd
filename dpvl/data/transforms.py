"""Host-side example transforms with fixed public constants (nothing is fit on private data)."""

import numpy as np
from PIL import Image

MEAN, STD = 0.5, 0.5  # per channel, on [0, 1] pixels: maps [0, 255] to [-1, 1]


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
  image = np.asarray(image)
  if image.ndim < 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}.")
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}.")
  return ((image.astype(np.float32) / 255.0) - MEAN) / STD


def model_image(image: np.ndarray, size: int) -> np.ndarray:
  """A record's uint8 image as a model input: normalised, checked to be [size, size, 3]."""
  image = normalize_image(image)
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
