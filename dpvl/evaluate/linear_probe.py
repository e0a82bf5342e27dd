"""Linear probe: a linear classifier trained on frozen features, scored by top-1 accuracy.

Features are computed once (the encoder is frozen), standardised with statistics of the probe's
own training split (a public, labelled evaluation set, never the private pretraining data; this
is ViP's non-affine BatchNorm at test time), and a softmax-regression layer is fit with optax
AdamW on mini-batches.

Config (`config.evals.<name>`, type "linear_probe"):
  data: a data config (`source`, `size`, ...) of any labelled source the data layer reads;
    records need `image` (uint8 [H, W, 3], resized and centre-cropped to the encoder's size)
    and an integer label under `label_key` (default "label"). Records that fail are skipped
    and counted.
  train_size, test_size: the first `train_size` records train the probe, the next
    `test_size` test it.
  blocks: k >= 1: mean-pooled tokens of the last k blocks, concatenated (ViP); 0: the plain
    last layer (mean-pooled tokens after the final LayerNorm).
  num_classes (default: largest label + 1), steps, batch_size, learning_rate, weight_decay.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpvl import progress
from dpvl.config import ConfigError
from dpvl.config import get_field
from dpvl.data import sources
from dpvl.data import transforms


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  train_accuracy: float
  test_accuracy: float
  num_train: int
  num_test: int
  num_classes: int


def mean_pooled_blocks(blocks, k: int) -> jax.Array:
  """ViP-style features: tokens of the last `k` blocks, mean-pooled, concatenated: [B, k * D]."""
  if not 1 <= k <= len(blocks):
    raise ValueError(f"cannot pool the last {k} of {len(blocks)} blocks.")
  return jnp.concatenate([jnp.mean(b, axis=1) for b in blocks[-k:]], axis=-1)


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     test_y: np.ndarray, num_classes: int, *, steps: int = 500,
                     batch_size: int = 256, learning_rate: float = 1e-2,
                     weight_decay: float = 1e-4, seed: int = 0) -> ProbeResult:
  """Fits softmax regression on (train_x, train_y) and reports top-1 accuracies.

  Features are standardised with the mean and std of `train_x`; the layer starts at zero and
  takes `steps` AdamW steps (cosine-decayed learning rate), each on a fresh batch of distinct
  examples.

  Args:
    train_x: float [N, D] features that train the probe.
    train_y: int [N] labels, in [0, num_classes).
    test_x: float [M, D] features that test it.
    test_y: int [M] labels, in [0, num_classes).
    num_classes: the classifier's outputs.
    steps: optimizer steps.
    batch_size: examples per step (at most N).
    learning_rate: AdamW's peak learning rate.
    weight_decay: AdamW's weight decay.
    seed: seeds the batches.

  Returns:
    The `ProbeResult`: train and test top-1 accuracy, N, M and `num_classes`.

  Raises:
    ValueError: unless `train_x` is 2-D and each split has one label per row.
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
  if train_x.ndim != 2 or len(train_x) != len(train_y) or len(test_x) != len(test_y):
    raise ValueError("linear probe needs features [N, D] with one label per row.")
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

  params = dict(w=jnp.zeros((train_x.shape[1], num_classes)), b=jnp.zeros(num_classes))
  optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps),
                          weight_decay=weight_decay)

  def logits(p, x):
    return x @ p["w"] + p["b"]

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

  @jax.jit
  def step(p, opt_state, x, y):
    grads = jax.grad(loss)(p, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  rng = np.random.default_rng(seed)
  opt_state = optimizer.init(params)
  batch_size = min(batch_size, len(train_x))
  for _ in range(steps):
    idx = rng.choice(len(train_x), size=batch_size, replace=False)
    params, opt_state = step(params, opt_state, train_x[idx], train_y[idx])

  accuracy = lambda x, y: float(np.mean(np.argmax(logits(params, x), -1) == y))
  return ProbeResult(accuracy(train_x, train_y), accuracy(test_x, test_y), len(train_x),
                     len(test_x), num_classes)


def encoder_features(tokens, blocks_out, k: int) -> jax.Array:
  """The probe's features: last k blocks pooled (k >= 1) or the final normed tokens (k = 0).

  Args:
    tokens: [B, T, D] tokens after the encoder's final LayerNorm (`Objective.encode`).
    blocks_out: every block's output tokens, [B, T, D] each.
    k: blocks pooled, in [0, len(blocks_out)].

  Returns:
    [B, D] mean-pooled final tokens (k = 0) or [B, k * D] (`mean_pooled_blocks`).
  """
  return jnp.mean(tokens, axis=1) if k == 0 else mean_pooled_blocks(blocks_out, k)


def load_labelled(source, count: int, image_size: int, label_key: str = "label",
                  desc: str = "records"):
  """The first `count` usable records as (uint8 images [n, S, S, 3], labels [n]) and the
  number of records skipped per reason; reads further records to replace skipped ones.

  Args:
    source: a random-access data source (`len` and `[index]`) of records with `image`.
    count: n, the records wanted.
    image_size: S; images are resized (shorter side) and centre-cropped to it.
    label_key: the record's field holding the integer label.
    desc: the progress bar's label (`dpvl.progress`, shown on a terminal only).

  Returns:
    (uint8 images [n, S, S, 3], int32 labels [n], {reason: records skipped}).

  Raises:
    ValueError: if the source holds fewer than `count` usable records.
  """
  images, labels, skipped = load_images(source, count, image_size,
                                        lambda record: int(record[label_key]), desc)
  return images, np.asarray(labels, np.int32), skipped


def load_images(source, count: int, image_size: int, extract, desc: str = "records"):
  """The first `count` usable records as (uint8 images [n, S, S, 3], [extract(record)],
  skipped per reason); a record whose image or `extract` fails is skipped and replaced.
  Images stay uint8 (a quarter of float32's memory): the evaluators normalise them chunk by
  chunk as the objective does (`chunked(..., prepare=objective.normalize)`).

  Args:
    source: a random-access data source (`len` and `[index]`) of records with `image`.
    count: n, the records wanted.
    image_size: S; images are resized (shorter side) and centre-cropped to it.
    extract: record -> value kept beside its image. A KeyError, TypeError, ValueError or
      OSError (reading the record, `extract`, or its image) skips the record.
    desc: the progress bar's label (`dpvl.progress`, shown on a terminal only).

  Returns:
    (uint8 images [n, S, S, 3], list of n extracted values,
    {reason: records skipped}); a skip's reason is a BadRecord's or the exception's type name.

  Raises:
    ValueError: if the source holds fewer than `count` usable records.
  """
  images, values, skipped = [], [], {}
  index = 0
  with progress.bar(count, desc, unit="record") as loading:
    while len(images) < count and index < len(source):
      try:
        record = source[index]
        value = extract(record)
        image = transforms.resize_center_crop(record["image"], image_size)
        transforms.normalize_image(image)  # checks it: shape [H, W, 3], dtype uint8
      except (KeyError, TypeError, ValueError, OSError) as e:
        reason = getattr(e, "reason", type(e).__name__)  # a data-layer BadRecord names it
        skipped[reason] = skipped.get(reason, 0) + 1
      else:
        images.append(image)
        values.append(value)
        loading.update(1)
      index += 1
  if len(images) < count:
    raise ValueError(f"the source holds {len(images)} usable records, {count} needed "
                     f"(skipped: {skipped}).")
  return np.stack(images), values, skipped


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  """`a` [m, ...] followed by zero rows up to [rows, ...] (fixed shapes: one compilation)."""
  return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])


def chunked(fn, chunk: int = 256, desc: str = "features", prepare=None):
  """Applies jitted `fn(params, x)` to `x` in fixed-size chunks (one compilation): returns
  apply(params, x) -> concatenated numpy outputs for the rows of x. `prepare` (e.g. the
  objective's `normalize`) maps each chunk on the host first. A progress bar labelled `desc`
  counts the chunks on a terminal (`dpvl.progress`)."""
  fn = jax.jit(fn)
  prepare = prepare or (lambda x: x)

  def apply(params, x):
    n = len(x)
    x = pad_rows(x, n + -n % chunk)
    batches = progress.track(range(0, len(x), chunk), desc=desc, unit="batch")
    return np.concatenate([np.asarray(fn(params, prepare(x[i:i + chunk])))
                           for i in batches])[:n]

  return apply


def feature_blocks(config, name: str) -> int:
  """`config.evals.<name>.blocks` (default 0: the last block only), checked against the
  encoder's depth."""
  k = int(get_field(config, f"evals.{name}.blocks", 0))
  depth = int(config.model.encoder.depth)
  if not 0 <= k <= depth:
    raise ConfigError(f"config.evals.{name}.blocks={k} must be in [0, {depth}] "
                      "(config.model.encoder.depth).")
  return k


def build(config, name: str, objective):
  """params -> {top1, train_top1, skipped}: the probe of `config.evals.<name>`.

  The probe's data is loaded here, once; each call encodes it and fits a new probe.

  Args:
    config: the run's config (`evals.<name>` and `model.encoder.depth`).
    name: the evaluator's key under `config.evals`.
    objective: the run's objective (its `encode` and `image_size`).

  Returns:
    params -> {top1: test accuracy, train_top1: train accuracy, skipped: records skipped}.

  Raises:
    ConfigError: for a bad field, data that cannot be read, or labels outside
      [0, num_classes).
  """
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  k = feature_blocks(config, name)
  n_train, n_test = int(field("train_size")), int(field("test_size"))
  if n_train < 1 or n_test < 1:
    raise ConfigError(f"config.evals.{name}.train_size and test_size must be positive.")
  try:
    source = sources.build_source(field("data"))
    images, labels, skipped = load_labelled(source, n_train + n_test, objective.image_size,
                                            field("label_key", "label"), f"{name}: images")
  except ValueError as e:
    raise ConfigError(f"config.evals.{name}.data: {e}") from None
  num_classes = int(field("num_classes", 0) or labels.max() + 1)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ConfigError(f"config.evals.{name}: labels must lie in [0, {num_classes}).")
  options = dict(steps=int(field("steps", 500)), batch_size=int(field("batch_size", 256)),
                 learning_rate=float(field("learning_rate", 1e-2)),
                 weight_decay=float(field("weight_decay", 1e-4)))
  features = chunked(lambda params, x: encoder_features(*objective.encode(params, x), k),
                     desc=f"{name}: features", prepare=objective.normalize)

  def evaluate(params):
    feats = features(params, images)
    result = fit_linear_probe(feats[:n_train], labels[:n_train], feats[n_train:],
                              labels[n_train:], num_classes, **options)
    return dict(top1=result.test_accuracy, train_top1=result.train_accuracy,
                skipped=sum(skipped.values()))

  return evaluate
