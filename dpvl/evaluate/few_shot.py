"""Few-shot classification on frozen features: 1, 2, 5, 10 labelled images per class.

The evaluation of ViP (Yu et al., 2024) and DP-Cap (Sander et al., 2024). For each number of
shots k and each seed, k images per class are drawn from a pool of public labelled images;
their frozen features (those of the linear probe, `linear_probe.encoder_features`) are centred
on the mean of that k-shot set and L2-normalised, and an L2-regularised multinomial logistic
regression is fit on them, full-batch, by L-BFGS. The score is top-1 accuracy on held-out
images: the mean over seeds and its standard deviation.

A seed draws max(shots) pool images per class once, at build time; its k-shot set is the first
k of them, so one seed's sets are nested and every evaluation during a run scores the same
images. Only the drawn images are kept and encoded.

Config (`config.evals.<name>`, type "few_shot"):
  data: a data config of any labelled source (as the linear probe's); the first `train_size`
    usable records are the pool the shots are drawn from. Every class needs max(shots)
    records there.
  test_data: optional data config of the test images (e.g. a validation split); default:
    `data`, the `test_size` records after the pool.
  train_size, test_size: the pool's and the test set's sizes, in usable records.
  label_key (default "label"), num_classes (default: largest label + 1).
  blocks: features of the last k blocks (k >= 1) or the final tokens (0), as the probe's.
  shots (default (1, 2, 5, 10)); seeds: a count (default 3: seeds 0, 1, 2) or a list.
  l2 (default 1e-3): weight of 1/2 ||W||^2 beside the mean cross-entropy (bias unpenalised);
  steps (default 100): the most L-BFGS iterations of a fit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpvl.config import ConfigError
from dpvl.config import get_field
from dpvl.data import sources
from dpvl.evaluate.linear_probe import chunked
from dpvl.evaluate.linear_probe import encoder_features
from dpvl.evaluate.linear_probe import feature_blocks
from dpvl.evaluate.linear_probe import load_labelled


def draw_shots(labels: np.ndarray, num_classes: int, count: int, seed: int) -> np.ndarray:
  """int [num_classes, count]: per class, `count` distinct indices of `labels` in random order.

  Args:
    labels: int [N] labels of the pool.
    num_classes: C; every class in [0, C) must have `count` examples.
    count: examples per class.
    seed: seeds the draw.

  Returns:
    Row c holds indices i with labels[i] == c; their first k are the seed's k-shot set.

  Raises:
    ValueError: if a class has fewer than `count` examples.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < count:
      raise ValueError(f"class {c} has {len(members)} examples in the pool, {count} needed.")
    rows.append(rng.permutation(members)[:count])
  return np.stack(rows)


def centre_and_normalise(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """`train_x` and `others` minus the mean of `train_x`, each row scaled to unit L2 norm."""
  mean = np.mean(train_x, axis=0)
  unit = lambda x: (x - mean) / np.maximum(np.linalg.norm(x - mean, axis=1, keepdims=True),
                                           1e-12)
  return [unit(x) for x in (train_x, *others)]


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, y, weights, l2, *, num_classes: int, steps: int):
  """Multinomial logistic regression {w [D, C], b [C]} minimising the weighted mean
  cross-entropy + l2 / 2 ||w||^2, by L-BFGS (at most `steps` iterations)."""

  def loss(p):
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y)
    return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  optimizer = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = optimizer.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), state

  def going(carry):
    count = optax.tree_utils.tree_get(carry[1], "count")
    grad = optax.tree_utils.tree_get(carry[1], "grad")
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad)))
    return (count == 0) | ((count < steps) & (norm > 1e-6))

  params = dict(w=jnp.zeros((x.shape[1], num_classes)), b=jnp.zeros(num_classes))
  return jax.lax.while_loop(going, step, (params, optimizer.init(params)))[0]


def fit_few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, num_classes: int, *, l2: float = 1e-3, steps: int = 100,
                 rows: int | None = None) -> float:
  """Top-1 test accuracy of logistic regression fit on a few-shot set.

  Features are centred on the mean of `train_x` and L2-normalised (`centre_and_normalise`).

  Args:
    train_x: float [N, D] features of the few-shot set.
    train_y: int [N] its labels, in [0, num_classes).
    test_x: float [M, D] features of the test images.
    test_y: int [M] their labels.
    num_classes: the classifier's outputs.
    l2: weight of 1/2 ||W||^2 (the bias is not penalised).
    steps: the most L-BFGS iterations.
    rows: pad the few-shot set with weightless rows to this many (>= N), so that sets of any
      size share one compilation (default N).

  Returns:
    The fraction of test images whose highest logit is their label.
  """
  train_x, test_x = centre_and_normalise(np.asarray(train_x, np.float32),
                                         np.asarray(test_x, np.float32))
  n = len(train_x)
  pad = (rows or n) - n
  if pad < 0 or n != len(train_y):
    raise ValueError(f"a few-shot set of {n} rows, {len(train_y)} labels, padded to {rows}.")
  x = np.concatenate([train_x, np.zeros((pad, train_x.shape[1]), np.float32)])
  y = np.concatenate([np.asarray(train_y, np.int32), np.zeros(pad, np.int32)])
  weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  p = _fit(x, y, weights, np.float32(l2), num_classes=num_classes, steps=steps)
  predictions = np.argmax(test_x @ np.asarray(p["w"]) + np.asarray(p["b"]), axis=1)
  return float(np.mean(predictions == np.asarray(test_y)))


def few_shot_metrics(pool_x: np.ndarray, pool_y: np.ndarray, test_x: np.ndarray,
                     test_y: np.ndarray, num_classes: int, draws, shots, *, l2: float = 1e-3,
                     steps: int = 100) -> dict[str, float]:
  """`<k>shot/top1` (mean over seeds) and `<k>shot/top1_std` for each k in `shots`.

  Args:
    pool_x: float [N, D] features of the pool.
    pool_y: int [N] its labels.
    test_x: float [M, D] features of the test images.
    test_y: int [M] their labels.
    num_classes: C.
    draws: one int [C, >= max(shots)] array of pool indices per seed (`draw_shots`).
    shots: the numbers k of examples per class.
    l2: the regularisation weight.
    steps: the most L-BFGS iterations of a fit.

  Returns:
    {f"{k}shot/top1": mean accuracy, f"{k}shot/top1_std": its std over seeds}.
  """
  rows = max(shots) * num_classes
  out = {}
  for k in shots:
    accuracies = []
    for draw in draws:
      idx = draw[:, :k].reshape(-1)
      accuracies.append(fit_few_shot(pool_x[idx], pool_y[idx], test_x, test_y, num_classes,
                                     l2=l2, steps=steps, rows=rows))
    out[f"{k}shot/top1"] = float(np.mean(accuracies))
    out[f"{k}shot/top1_std"] = float(np.std(accuracies))
  return out


def build(config, name: str, objective):
  """params -> few-shot accuracies of `config.evals.<name>`.

  The pool and the test images are loaded and the shots drawn here, once; each call encodes
  the drawn and the test images and fits one classifier per (shots, seed).

  Args:
    config: the run's config (`evals.<name>` and `model.encoder.depth`).
    name: the evaluator's key under `config.evals`.
    objective: the run's objective (its `encode` and `image_size`).

  Returns:
    params -> {<k>shot/top1, <k>shot/top1_std for each k, chance, skipped}.

  Raises:
    ConfigError: for a bad field, data that cannot be read, labels outside
      [0, num_classes), or a class with fewer than max(shots) records in the pool.
  """
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  k = feature_blocks(config, name)
  shots = sorted({int(s) for s in field("shots", (1, 2, 5, 10))})
  seeds = field("seeds", 3)
  seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
  n_pool, n_test = int(field("train_size")), int(field("test_size"))
  if not shots or shots[0] < 1 or not seeds or n_pool < 1 or n_test < 1:
    raise ConfigError(f"config.evals.{name}: shots, seeds, train_size and test_size must be "
                      "positive.")
  label_key, test_data = field("label_key", "label"), field("test_data", None)
  try:
    load = lambda data, count, what: load_labelled(
        sources.build_source(data), count, objective.image_size, label_key, f"{name}: {what}")
    if test_data is None:
      images, labels, skipped = load(field("data"), n_pool + n_test, "images")
      test_images, test_labels = images[n_pool:], labels[n_pool:]
      images, labels = images[:n_pool], labels[:n_pool]
    else:
      images, labels, skipped = load(field("data"), n_pool, "pool")
      test_images, test_labels, test_skipped = load(test_data, n_test, "test images")
      skipped = {r: skipped.get(r, 0) + test_skipped.get(r, 0)
                 for r in {*skipped, *test_skipped}}
  except ValueError as e:
    raise ConfigError(f"config.evals.{name}.data: {e}") from None
  num_classes = int(field("num_classes", 0) or max(labels.max(), test_labels.max()) + 1)
  if min(labels.min(), test_labels.min()) < 0 or max(labels.max(),
                                                     test_labels.max()) >= num_classes:
    raise ConfigError(f"config.evals.{name}: labels must lie in [0, {num_classes}).")
  try:
    draws = [draw_shots(labels, num_classes, shots[-1], seed) for seed in seeds]
  except ValueError as e:
    raise ConfigError(f"config.evals.{name}.train_size={n_pool}: {e}") from None
  kept, draws = np.unique(np.stack(draws), return_inverse=True)  # encode drawn images only
  draws = list(draws.reshape(len(seeds), num_classes, shots[-1]))
  images, labels = images[kept], labels[kept]
  options = dict(l2=float(field("l2", 1e-3)), steps=int(field("steps", 100)))
  features = chunked(lambda params, x: encoder_features(*objective.encode(params, x), k),
                     desc=f"{name}: features", prepare=objective.normalize)

  def evaluate(params):
    feats = features(params, np.concatenate([images, test_images]))
    out = few_shot_metrics(feats[:len(images)], labels, feats[len(images):], test_labels,
                           num_classes, draws, shots, **options)
    return dict(out, chance=1.0 / num_classes, skipped=sum(skipped.values()))

  return evaluate
