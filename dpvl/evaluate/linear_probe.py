"""Linear probe: a linear classifier trained on frozen features, scored by top-1 accuracy.

Features are computed once (the encoder is frozen), standardised with statistics of the probe's
own training split (a public, labelled evaluation set, never the private pretraining data), and
a softmax-regression layer is fit with optax AdamW on mini-batches.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
  """Fits softmax regression on (train_x, train_y) and reports top-1 accuracies."""
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
