"""Evaluations of a captioner (DP-Cap, Sander et al., 2024) by its caption loss and its captions.

A captioner scores a caption for an image by the loss it trains on: the mean next-token
cross-entropy of the caption (`dpcap.masked_token_loss`); a lower loss is a better match. Three
evaluators read it (Tschannen et al., 2023, "Image Captioners Are Scalable Vision Learners
Too"; Yuksekgonul et al., 2023, "When and Why Vision-Language Models Behave Like
Bags-of-Words"):

* `caption_zero_shot`: each class name is put into prompt templates; an image's class is the
  one whose prompts have the lowest mean loss. Top-1 (and top-5 for more than 5 classes).
  Config: data (a labelled source), label_key, class_names (index = label), templates
  (default ["this is a photo of a {}"]), size (images scored), batch_size.
* `caption_order`: ARO-style compositionality. A JSON file (`path`) lists items
  {"image": path (absolute, or relative to the JSON file), "captions": [str, ...],
  "label": index of the true caption, optional "box": [x, y, w, h] pixels to crop first};
  top1 is the fraction of items whose true caption has a strictly lower loss than every
  other. Items that cannot be used are skipped and counted by reason. Config: path,
  batch_size.
* `caption_samples`: greedy captions of `count` images of a data config (`data`), returned as
  an artifact (`dpvl.evaluate.split_outputs`), with the record's caption, if any, as reference.

Images are resized (shorter side) and centre-cropped to the encoder's size. Scoring runs in
jitted chunks of `batch_size` (image, caption) pairs; each chunk encodes its images once.
"""

import functools
import json
import numbers
import os

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from dpvl import progress
from dpvl.config import ConfigError
from dpvl.config import get_field
from dpvl.data import errors
from dpvl.data import sources
from dpvl.data import tokenizers
from dpvl.data import transforms
from dpvl.evaluate.linear_probe import load_images
from dpvl.evaluate.linear_probe import pad_rows
from dpvl.evaluate.zero_shot import load_classes
from dpvl.models.captioner import Captioner
from dpvl.objectives import dpcap

DEFAULT_TEMPLATES = ("this is a photo of a {}",)


def check_captioner(objective, name: str) -> None:
  """ConfigError unless `objective` is DP-Cap's (a captioner whose loss scores captions)."""
  if objective.name != "dpcap" or not isinstance(objective.model, Captioner):
    raise ConfigError(f"config.evals.{name} needs a captioner: config.objective='dpcap', not "
                      f"{objective.name!r}.")


def caption_scorer(objective, tokenizer, batch_size: int = 512, desc: str = "captions"):
  """The captioner's loss of every given caption of every image, in jitted chunks.

  Args:
    objective: the DP-Cap objective (its `model`).
    tokenizer: the run's tokenizer (its pad and EOS ids).
    batch_size: (image, caption) pairs per jitted call; one call encodes its images once.
    desc: the progress bar's label (`dpvl.progress`, shown on a terminal only).

  Returns:
    score(params, uint8 images [N, S, S, 3], tokens int [N, K, L] (BOS, caption,
    EOS, pad; a broadcast view is fine)) -> float32 [N, K]: `dpcap.masked_token_loss` of
    caption k under image n, the loss of training.
  """
  model, pad_id, eos_id = objective.model, tokenizer.pad_id, tokenizer.eos_id

  @jax.jit
  def losses(params, images, tokens):  # [b, S, S, 3], [b, k, L] -> [b, k]
    b, k, length = tokens.shape
    memory = model.apply({"params": params}, images, method=Captioner.encode_images)
    flat = tokens.reshape(b * k, length)
    logits = model.apply({"params": params}, flat[:, :-1], jnp.repeat(memory, k, axis=0),
                         method=Captioner.decode)
    loss = jax.vmap(dpcap.masked_token_loss, in_axes=(0, 0, None, None))(
        logits, flat[:, 1:], pad_id, eos_id)
    return loss.reshape(b, k)

  def score(params, images, tokens):
    n, k = tokens.shape[:2]
    used = np.flatnonzero(np.any(tokens != pad_id, axis=(0, 1)))
    length = max(2, int(used[-1]) + 1 if len(used) else 2)  # drop the all-pad tail
    kc = min(k, batch_size)
    b = max(1, batch_size // kc)
    out = np.zeros((n, k), np.float32)
    chunks = [(i, j) for i in range(0, n, b) for j in range(0, k, kc)]
    for i, j in progress.track(chunks, desc=desc, unit="batch"):
      x = images[i:i + b]
      t = np.full((b, kc, length), pad_id, np.int32)
      t[:len(x), :min(kc, k - j)] = tokens[i:i + b, j:j + kc, :length]
      x = pad_rows(x, b)
      got = np.asarray(losses(params, objective.normalize(x), t))
      out[i:i + b, j:j + kc] = got[:min(b, n - i), :min(kc, k - j)]
    return out

  return score


def class_losses(losses: np.ndarray, num_classes: int) -> np.ndarray:
  """[N, num_classes * templates] losses of the prompts (class-major) -> [N, num_classes]
  mean loss of each class's prompts."""
  return losses.reshape(losses.shape[0], num_classes, -1).mean(axis=2)


def top_k_accuracy(losses: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows of `losses` [N, C] whose label is among their k lowest losses (ties
  broken by class index)."""
  ranked = np.argsort(losses, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(ranked == np.asarray(labels)[:, None], axis=1)))


def order_accuracy(losses: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows of `losses` [N, K] (inf for absent captions) whose labelled caption has
  a strictly lower loss than every other caption of the row."""
  labels = np.asarray(labels)
  rows = np.arange(len(labels))
  own = losses[rows, labels]
  others = losses.copy()
  others[rows, labels] = np.inf
  return float(np.mean(own < others.min(axis=1)))


def build_zero_shot(config, name: str, objective):
  """params -> {top1, top5 (more than 5 classes), chance, skipped}: zero-shot classification
  of `config.evals.<name>` by the captioner's loss of the class prompts.

  The images are loaded and the prompts tokenized here, once; each call scores every prompt
  for every image.

  Args:
    config: the run's config (`evals.<name>` and `tokenizer`).
    name: the evaluator's key under `config.evals`.
    objective: the run's objective; DP-Cap's.

  Returns:
    params -> {top1, top5 if more than 5 classes, chance: 1 / classes, skipped: records}.

  Raises:
    ConfigError: for another objective, missing class names, a template without '{}', data
      that cannot be read, or labels that do not index `class_names`.
  """
  check_captioner(objective, name)
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  class_names = list(field("class_names"))
  templates = list(field("templates", DEFAULT_TEMPLATES) or DEFAULT_TEMPLATES)
  if not class_names or any("{}" not in t for t in templates):
    raise ConfigError(f"config.evals.{name} needs class_names and templates with '{{}}'.")
  tokenizer = tokenizers.build_tokenizer(get_field(config, "tokenizer"))
  images, labels, skipped = load_classes(config, name, objective, len(class_names))
  prompts = np.stack([tokenizer.encode(t.format(c)) for c in class_names for t in templates])
  score = caption_scorer(objective, tokenizer, int(field("batch_size", 512)),
                         f"{name}: prompt losses")
  ks = (1, 5) if len(class_names) > 5 else (1,)

  def evaluate(params):
    losses = score(params, images, np.broadcast_to(prompts, (len(images), *prompts.shape)))
    per_class = class_losses(losses, len(class_names))
    out = {f"top{k}": top_k_accuracy(per_class, labels, k) for k in ks}
    return dict(out, chance=1.0 / len(class_names), skipped=sum(skipped.values()))

  return evaluate


def _bad(reason: str, detail: str = ""):
  return errors.BadRecord(reason, detail)


def _read_item(item, root: epath.Path, image_size: int):
  """(uint8 image [S, S, 3], captions, label) of one item; BadRecord naming the reason."""
  if not isinstance(item, dict) or not {"image", "captions", "label"} <= set(item):
    raise _bad("bad_item", "an item needs image, captions and label")
  captions, label = item["captions"], item["label"]
  if (not isinstance(captions, list) or len(captions) < 2
      or not all(isinstance(c, str) for c in captions)):
    raise _bad("bad_captions", "captions must be a list of at least two strings")
  if (not isinstance(label, numbers.Integral) or isinstance(label, bool)
      or not 0 <= label < len(captions)):
    raise _bad("bad_label", f"label {label!r} does not index {len(captions)} captions")
  if not isinstance(item["image"], str) or not item["image"]:
    raise _bad(errors.MISSING_IMAGE, "image must be a path")
  path = item["image"]
  path = epath.Path(path) if os.path.isabs(path) or "://" in path else root / path
  try:
    data = path.read_bytes()
  except (OSError, ValueError) as e:
    raise _bad(errors.MISSING_IMAGE, f"{type(e).__name__}") from None
  image = transforms.decode_image(data)
  box = item.get("box")
  if box is not None:
    try:
      x, y, w, h = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
      raise _bad("bad_box", f"box {box!r} is not [x, y, w, h]") from None
    image = image[max(y, 0):y + h, max(x, 0):x + w]
    if min(image.shape[:2]) < 1:
      raise _bad("bad_box", f"box {box!r} holds no pixel of the image")
  image = transforms.resize_center_crop(image, image_size)
  return image, captions, int(label)


def load_order_items(path: str, image_size: int, desc: str = "items"):
  """The usable items of an ARO-style JSON file, and the number skipped per reason.

  Args:
    path: the JSON file: a list of {"image", "captions", "label", optional "box"}.
    image_size: S; images are cropped to `box` if given, then resized (shorter side) and
      centre-cropped to S.
    desc: the progress bar's label (`dpvl.progress`, shown on a terminal only).

  Returns:
    (uint8 images [n, S, S, 3], n lists of captions, int32 labels [n],
    {reason: items skipped}); reasons: bad_item, bad_captions, bad_label, bad_box,
    missing_image, corrupt_image.

  Raises:
    ValueError: if the file cannot be read, is not a JSON list, or has no usable item.
  """
  path = epath.Path(path)
  try:
    items = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable JSON file: {type(e).__name__}: {e}") from None
  if not isinstance(items, list):
    raise ValueError(f"{path} holds {type(items).__name__}, not a list of items.")
  images, captions, labels, skipped = [], [], [], {}
  for item in progress.track(items, desc=desc, unit="item"):
    try:
      image, texts, label = _read_item(item, path.parent, image_size)
    except errors.BadRecord as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
    else:
      images.append(image)
      captions.append(texts)
      labels.append(label)
  if not images:
    raise ValueError(f"{path} holds no usable item of {len(items)} (skipped: {skipped}).")
  return np.stack(images), captions, np.asarray(labels, np.int32), skipped


def build_order(config, name: str, objective):
  """params -> {top1, chance, items, skipped, skipped/<reason>}: the ARO-style caption
  order test of `config.evals.<name>` (see the module docstring for the file's format).

  The items are read and their captions tokenized here, once; each call scores every
  caption of every item.

  Args:
    config: the run's config (`evals.<name>` and `tokenizer`).
    name: the evaluator's key under `config.evals`.
    objective: the run's objective; DP-Cap's.

  Returns:
    params -> {top1: items whose true caption has the lowest loss, chance: mean of
    1 / captions per item, items: items scored, skipped: items skipped, skipped/<reason>:
    per reason that occurred}.

  Raises:
    ConfigError: for another objective, or a file that cannot be read or has no usable item.
  """
  check_captioner(objective, name)
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  tokenizer = tokenizers.build_tokenizer(get_field(config, "tokenizer"))
  try:
    images, captions, labels, skipped = load_order_items(str(field("path")),
                                                         objective.image_size, f"{name}: items")
  except ValueError as e:
    raise ConfigError(f"config.evals.{name}.path: {e}") from None
  width = max(len(c) for c in captions)
  tokens = np.full((len(captions), width, tokenizer.max_len), tokenizer.pad_id, np.int32)
  present = np.zeros((len(captions), width), bool)
  for i, texts in enumerate(captions):
    tokens[i, :len(texts)] = [tokenizer.encode(t) for t in texts]
    present[i, :len(texts)] = True
  score = caption_scorer(objective, tokenizer, int(field("batch_size", 512)),
                         f"{name}: caption losses")
  counts = {f"skipped/{reason}": n for reason, n in sorted(skipped.items())}

  def evaluate(params):
    losses = np.where(present, score(params, images, tokens), np.inf)
    return dict(top1=order_accuracy(losses, labels),
                chance=float(np.mean(1.0 / present.sum(axis=1))), items=len(labels),
                skipped=sum(skipped.values()), **counts)

  return evaluate


def _reference(record):
  caption = record.get("caption") if hasattr(record, "get") else None
  return caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption


def build_samples(config, name: str, objective):
  """params -> {captions: artifact, skipped}: greedy captions of `config.evals.<name>`'s
  images.

  Config: data (any source with `image`), count (default 8), max_len (default and at most
  `config.tokenizer.max_len`: tokens decoded, BOS included).

  Args:
    config: the run's config (`evals.<name>` and `tokenizer`).
    name: the evaluator's key under `config.evals`.
    objective: the run's objective; DP-Cap's.

  Returns:
    params -> {captions: [{"caption": greedy caption, "reference": the record's caption or
    None}, ...] (not a number: `dpvl.evaluate.split_outputs` sets it apart), skipped}.

  Raises:
    ConfigError: for another objective, a bad max_len, or data that cannot be read.
  """
  check_captioner(objective, name)
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  tokenizer = tokenizers.build_tokenizer(get_field(config, "tokenizer"))
  max_len = int(field("max_len", 0) or tokenizer.max_len)
  if not 2 <= max_len <= tokenizer.max_len:
    raise ConfigError(f"config.evals.{name}.max_len={max_len} must be in "
                      f"[2, {tokenizer.max_len}] (config.tokenizer.max_len).")
  try:
    images, references, skipped = load_images(sources.build_source(field("data")),
                                               int(field("count", 8)), objective.image_size,
                                               _reference, f"{name}: images")
  except ValueError as e:
    raise ConfigError(f"config.evals.{name}.data: {e}") from None
  decode = jax.jit(functools.partial(
      dpcap.greedy_decode, objective.model, max_len=max_len, bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id))

  def evaluate(params):
    ids = np.asarray(decode(params, objective.normalize(images)))
    captions = [dict(caption=tokenizer.decode(row), reference=ref)
                for row, ref in zip(ids, references)]
    return dict(captions=captions, skipped=sum(skipped.values()))

  return evaluate
