"""Image-caption records as webdataset writes them: a key and its members by extension.

`decode(parts, ...)` is the one path from raw members (`{"jpg": bytes, "txt": bytes,
"json": bytes}`, as in img2dataset's tar shards) to a record the objectives read:
`image` uint8 [S, S, 3], `caption` str, `key`, `index`, and `json` metadata when present.
`pack`/`unpack` store raw members as one ArrayRecord entry (msgpack; no pickle).
"""

import json

import msgpack

from dpvl.data import errors
from dpvl.data import transforms

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
CROPS = ("center", "random_resized")


def image_part(parts: dict) -> bytes:
  """The bytes of the image member; raises BadRecord(missing_image)."""
  for ext in IMAGE_EXTENSIONS:
    if ext in parts:
      return parts[ext]
  raise errors.BadRecord(errors.MISSING_IMAGE)


def check_parts(parts: dict) -> None:
  """Raises BadRecord when `parts` lacks an image or a caption member."""
  image_part(parts)
  if not any(ext in parts for ext in CAPTION_EXTENSIONS):
    raise errors.BadRecord(errors.MISSING_CAPTION)


def decode(parts: dict, index: int, image_size: int, crop: str = "center") -> dict:
  """The record of raw members `parts`; raises BadRecord with the reason it is unusable.

  Args:
    parts: raw members by extension (bytes), and `__key__` when known.
    index: the record's index in its source; stored in the record.
    image_size: S, the side of the model's images in pixels.
    crop: "center" (shorter side to S, centre crop) or "random_resized" (the whole image, its
      shorter side between S and 2S: the loader crops it afresh at every draw,
      `transforms.Augmentation`).

  Returns:
    {`image`: uint8 [S, S, 3] (or [H, W, 3] for "random_resized"), `caption`: clean str,
    `index`: int, `key`: str}, plus `json` (the parsed metadata, or None if it does not
    parse) when `parts` has a json member.

  Raises:
    errors.BadRecord: with the reason the record is unusable (missing or corrupt image,
      missing, empty or non-UTF-8 caption).
    ValueError: for an unknown `crop` (a config error, not a bad record).
  """
  check_parts(parts)
  caption = transforms.clean_caption(parts["txt"])
  image = transforms.decode_image(image_part(parts), min_size=image_size)
  if crop == "center":
    image = transforms.resize_center_crop(image, image_size)
  elif crop == "random_resized":
    image = transforms.resize_shorter_side(image, image_size, 2 * image_size)
  else:
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}.")
  record = dict(image=image, caption=caption, index=int(index), key=parts.get("__key__", ""))
  if "json" in parts:
    try:
      record["json"] = json.loads(parts["json"])
    except (ValueError, UnicodeDecodeError):
      record["json"] = None  # metadata is optional: a bad one does not cost the record
  return record


def pack(parts: dict) -> bytes:
  """Raw members (str keys, bytes values) as one msgpack blob."""
  return msgpack.packb(dict(parts), use_bin_type=True)


def unpack(blob: bytes) -> dict:
  return msgpack.unpackb(blob, raw=False)
