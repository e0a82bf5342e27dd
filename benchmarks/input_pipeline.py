"""Decoded images per second per core: JPEG decode + resize/crop + normalise + tokenise.

  python benchmarks/input_pipeline.py [--images=256] [--source_size=512x384] [--size=224]

Generates JPEGs in memory (smooth random images at LAION-like resolution, quality 90), then
runs dpvl's record path (`records.decode`: caption cleaning, decode, centre crop or, with
--crop=random_resized, the whole image drawn afresh by the loader's `transforms.Augmentation`:
RandomResizedCrop 0.2-1 + flip; then the normalisation and the byte tokenizer) on one core,
and in W worker processes (spawned, as `BatchLoader(processes=W)` does). Prints images/second,
total and per core.
"""

import argparse
import concurrent.futures
import io
import multiprocessing
import os
import time

import numpy as np
from PIL import Image

from dpvl.data import records
from dpvl.data import tokenizers
from dpvl.data import transforms


def make_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  out = []
  for _ in range(count):
    f = rng.uniform(0.005, 0.05, size=(3, 2))
    image = np.stack([np.sin(x * a + y * b + rng.uniform(0, 6)) for a, b in f], -1)
    image = (image + 1) * 110 + rng.integers(0, 30, size=image.shape)  # texture: real entropy
    buf = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out


_TOKENIZER = tokenizers.ByteTokenizer(64)


def process(args) -> int:
  """Runs the record path on a list of JPEGs; returns how many were decoded."""
  jpegs, size, crop = args
  augment = transforms.Augmentation(size) if crop == "random_resized" else None
  for i, data in enumerate(jpegs):
    record = records.decode(dict(jpg=data, txt=b"a photo of a  thing\n"), i, size, crop)
    image = record["image"] if augment is None else augment(record["image"], i, step=0)
    transforms.normalize_image(image, "imagenet")
    _TOKENIZER.encode(record["caption"])
  return len(jpegs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--source_size", default="512x384", help="WIDTHxHEIGHT of the JPEGs")
  parser.add_argument("--size", type=int, default=224, help="model image size")
  parser.add_argument("--crop", default="center", choices=records.CROPS)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  args = parser.parse_args()
  width, height = map(int, args.source_size.split("x"))
  jpegs = make_jpegs(args.images, width, height)
  print(f"{args.images} JPEGs {width}x{height} (mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f}"
        f" kB) -> {args.size}x{args.size} ({args.crop} crop), normalised, tokenised")
  process((jpegs[:8], args.size, args.crop))  # warm-up
  t = time.perf_counter()
  process((jpegs, args.size, args.crop))
  single = args.images / (time.perf_counter() - t)
  print(f"1 process: {single:.0f} images/s (per core: {single:.0f})")
  workers = args.workers
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    list(pool.map(process, [(jpegs[:4], args.size, args.crop)] * workers))  # start workers
    chunks = [(jpegs[i::workers], args.size, args.crop) for i in range(workers)]
    t = time.perf_counter()
    done = sum(pool.map(process, chunks))
    multi = done / (time.perf_counter() - t)
  print(f"{workers} processes: {multi:.0f} images/s (per core: {multi / workers:.0f})")


if __name__ == "__main__":
  main()
