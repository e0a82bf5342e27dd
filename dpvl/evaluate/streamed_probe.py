"""Paper-scale linear probe (ImageNet-1k): frozen features streamed to disk, a BatchNorm +
linear head trained with LARS on mini-batches read back from there.

The protocol of MAE's linear probing, which ViP and DP-Cap report: the encoder is frozen; its
features (`blocks`: the last k blocks' tokens mean-pooled and concatenated, ViP: k = 12; or the
final normed tokens, k = 0) go through a BatchNorm without affine parameters (eps 1e-6) and a
linear layer trained by LARS (momentum 0.9, no weight decay, lr = base lr 0.1 x batch / 256,
batch 16,384, 90 epochs of which 10 warm up linearly, then a half cosine to 0); the score is
top-1 (and top-5) on the validation split.

What differs from the papers' probe, and why:
* Features are computed once per evaluation, from the centre crop (the record resized so that
  its shorter side is S / crop_fraction, then the centre S x S), and reused every epoch. The
  papers recompute them each epoch from a fresh RandomResizedCrop + flip of the training
  images: 90 encoder passes over the split instead of one. The effect of fixed features on
  top-1 has not been measured in dpvl; it is expected to be small (of the order of a point,
  possibly in either direction: no augmentation lets the head fit the training features more
  closely, which can cost some generalisation).
* The BatchNorm normalises with the exact mean and (biased) variance of the probe's training
  features, computed while they are extracted, in training and at test time alike; torch's
  BatchNorm uses each batch's statistics in training and running averages at test time. At
  batch 16,384 the two nearly agree.

Memory: features never sit in RAM whole. Records are read in chunks of `encode_batch` by a
thread pool (the next chunk is read while the current one is encoded), encoded, and written to
a raw float16 (or float32) file in a scratch directory, n x d x itemsize bytes: 1.28M x 9,216
x 2 B = 23.6 GB for ImageNet's train split at k = 12 (0.9 GB for validation). The head's
mini-batches are read from that file (memory-mapped), a batch of 16,384 x 9,216 float16 is
0.3 GB; the head itself is d x classes float32 (37 MB), with its LARS momentum.

Several hosts (`split_over_hosts`, for a process group that calls the evaluator on every
process): host h extracts its own contiguous share of each split (`host_share`), the head's
global batch is the hosts' local batches (`jax.make_array_from_process_local_data`; the jitted
step's mean loss, hence its gradient, spans them all), and the BatchNorm statistics and the
top-k counts are combined across hosts (`combine_moments`, `sum_counts`). Off (the default),
one process does it all: dpvl's training loop calls evaluators on the primary process only.

Config (`config.evals.<name>`, type "streamed_linear_probe"):
  data, test_data: data configs of the training and the test split (any labelled source,
    e.g. TFDS imagenet2012 train / validation); records need `image` (uint8 [H, W, 3]) and an
    integer label under `label_key` (default "label"). A record that cannot be read is skipped
    and counted; a label outside [0, num_classes) is a ConfigError.
  train_size, test_size: use the first n records of each split (default 0: all of it).
  num_classes: default the training source's `num_classes` (TFDS sources have it).
  blocks: as the linear probe's.
  epochs (90), warmup_epochs (10), batch_size (16,384), base_learning_rate (0.1),
    optimizer ("lars", or "sgd": SGD with the same momentum and schedule), momentum (0.9),
    weight_decay (0), trust_coefficient (LARS, 0.001), bn_eps (1e-6), seed (0).
  crop_fraction (1.0; 0.875: MAE's Resize(256) + CenterCrop(224)), encode_batch (256 records
    per encoder call), workers (16 reading threads), feature_dtype ("float16" or "float32"),
  feature_cache_dir (default: the system's temporary directory), keep_features (False: the
    features are deleted after each evaluation), split_over_hosts (False).
"""

import collections
import concurrent.futures
import dataclasses
import os
import shutil
import tempfile
from typing import Callable, Iterator

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from dpvl import progress
from dpvl.config import ConfigError
from dpvl.config import get_field
from dpvl.data import sources
from dpvl.data import transforms
from dpvl.evaluate.linear_probe import encoder_features
from dpvl.evaluate.linear_probe import feature_blocks
from dpvl.evaluate.linear_probe import pad_rows
from dpvl.parallel import hosts as hosts_lib

P = jax.sharding.PartitionSpec
FEATURE_DTYPES = ("float16", "float32")
OPTIMIZERS = ("lars", "sgd")


class ProbeDataError(ValueError):
  """The data cannot make a probe (labels out of range, too few records, no disk space...)."""


# -- hosts ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hosts:
  """The processes that share an evaluation: this one's `index` of `count`; `gather`: a numpy
  array -> every process's, stacked [count, ...] in process order; `gather_objects`: a
  JSON-able value -> the list of every process's."""

  index: int = 0
  count: int = 1
  gather: Callable[[np.ndarray], np.ndarray] = lambda x: np.asarray(x)[None]
  gather_objects: Callable[[object], list] = lambda obj: [obj]


def process_hosts(split: bool) -> Hosts:
  """All of JAX's processes when `split` (each calls the evaluator), else this one alone."""
  if not split or jax.process_count() == 1:
    return Hosts()
  return Hosts(jax.process_index(), jax.process_count(),
               lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x))),
               hosts_lib.gather_json)


def host_share(n: int, host: int, num_hosts: int) -> tuple[int, int]:
  """[start, stop): host `host`'s contiguous share of n records; shares differ by at most one
  record and together cover [0, n) in host order.

  >>> [host_share(10, h, 3) for h in range(3)]
  [(0, 4), (4, 7), (7, 10)]
  """
  if not 0 <= host < num_hosts:
    raise ValueError(f"host must be in [0, {num_hosts}), got {host}.")
  per, extra = divmod(n, num_hosts)
  start = host * per + min(host, extra)
  return start, start + per + (host < extra)


def moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  """(n, mean, biased variance) of the rows of x [n, d], in float64."""
  x = np.asarray(x, np.float64)
  return len(x), x.mean(0), x.var(0)


def combine_moments(counts, means, variances) -> tuple[int, np.ndarray, np.ndarray]:
  """(n, mean, biased variance) of the union of row sets given by their own (n_i, mean_i,
  variance_i) (Chan et al.'s pairwise update, in float64); parts with n_i = 0 are ignored.

  Args:
    counts: [p] rows per part (or [p, 1], as gathered from one-element arrays).
    means: [p, d] their means.
    variances: [p, d] their biased variances.
  """
  counts = np.asarray(counts, np.float64).reshape(-1)
  means, variances = np.asarray(means, np.float64), np.asarray(variances, np.float64)
  n = counts.sum()
  if n == 0:
    return 0, np.zeros(means.shape[1:]), np.zeros(means.shape[1:])
  mean = (counts[:, None] * means).sum(0) / n
  m2 = (counts[:, None] * (variances + (means - mean) ** 2)).sum(0)
  return int(n), mean, m2 / n


class RunningMoments:
  """Moments of rows added chunk by chunk (`combine_moments` of the chunks)."""

  def __init__(self, dim: int):
    self.count, self.mean, self.var = 0, np.zeros(dim), np.zeros(dim)

  def add(self, x: np.ndarray) -> None:
    if len(x):
      n, mean, var = moments(x)
      self.count, self.mean, self.var = combine_moments(
          [self.count, n], [self.mean, mean], [self.var, var])


def sum_counts(gathered: np.ndarray) -> np.ndarray:
  """Per-host counts [hosts, k] (`Hosts.gather` of each host's [k]) -> their totals [k]."""
  return np.asarray(gathered, np.int64).sum(0)


def steps_per_epoch(local_counts, batch_size: int) -> int:
  """Steps of an epoch: every host contributes batch_size / hosts rows per step, drawn without
  replacement from its own rows, so the host with the fewest rows sets the count (the rest of
  an epoch's rows are left out of it; the next epoch draws afresh)."""
  local_batch = batch_size // len(local_counts)
  return int(min(local_counts)) // local_batch


def epoch_batches(num_rows: int, local_batch: int, steps: int, seed: int, epoch: int,
                  host: int) -> np.ndarray:
  """int [steps, local_batch]: the local rows of each step of `epoch` on `host`: a seeded
  permutation of [0, num_rows), cut into batches, each sorted (faster reads from disk; a
  batch's order does not change its mean gradient)."""
  rng = np.random.default_rng([seed, epoch, host])
  rows = rng.permutation(num_rows)[:steps * local_batch].reshape(steps, local_batch)
  return np.sort(rows, axis=1)


# -- reading and extracting -----------------------------------------------------------------


def centre_view(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """uint8 [size, size, 3]: the image resized so that its shorter side is
  round(size / crop_fraction) (bicubic), and its centre size x size."""
  outer = max(size, round(size / crop_fraction))
  image = transforms.resize_center_crop(image, outer)
  top = (outer - size) // 2
  return image[top:top + size, top:top + size]


def read_example(source, index: int, image_size: int, label_key: str, normalize,
                 crop_fraction: float = 1.0):
  """(normalised float32 image [S, S, 3], int label) of record `index`; raises KeyError,
  TypeError, ValueError or OSError for a record that cannot be used."""
  record = source[int(index)]
  label = int(record[label_key])
  return normalize(centre_view(record["image"], image_size, crop_fraction)), label


def _attempt(read, index):
  """(example, None) or (None, reason) (a BadRecord's reason, or the exception's type)."""
  try:
    return read(index), None
  except (KeyError, TypeError, ValueError, OSError) as e:
    return None, getattr(e, "reason", type(e).__name__)


def stream_examples(read, start: int, stop: int, chunk: int,
                    workers: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
  """The usable examples of records [start, stop), chunk by chunk: (images [m, ...], int32
  labels [m], {reason: records skipped}) per `chunk` records (m <= chunk), in record order.

  Records are read by `read(index) -> (image, label)` in a pool of `workers` threads; the next
  chunk is read while the caller works on the current one, so at most two chunks are in memory.
  """
  starts = list(range(start, stop, chunk))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    submit = lambda s: [pool.submit(_attempt, read, i) for i in range(s, min(s + chunk, stop))]
    pending = submit(starts[0]) if starts else []
    for i in range(len(starts)):
      futures, pending = pending, (submit(starts[i + 1]) if i + 1 < len(starts) else [])
      results = [f.result() for f in futures]
      skipped = collections.Counter(r for _, r in results if r is not None)
      kept = [e for e, r in results if r is None]
      images = np.stack([e[0] for e in kept]) if kept else None
      yield images, np.asarray([e[1] for e in kept], np.int32), dict(skipped)


class FeatureFile:
  """A raw on-disk array of feature rows [<= capacity, d], written row block by row block,
  then read back memory-mapped: n x d x itemsize bytes once `close`d."""

  def __init__(self, path: str, capacity: int, dim: int, dtype: str):
    self.path, self.dim, self.dtype, self.count = path, dim, np.dtype(dtype), 0
    self._array = (np.memmap(path, self.dtype, mode="w+", shape=(capacity, dim))
                   if capacity else None)
    if not capacity:
      open(path, "wb").close()

  def append(self, rows: np.ndarray) -> None:
    self._array[self.count:self.count + len(rows)] = rows
    self.count += len(rows)

  def close(self) -> np.ndarray:
    """The rows written, read-only and memory-mapped (the file cut to their size)."""
    if self._array is not None:
      self._array.flush()
      self._array = None
    os.truncate(self.path, self.count * self.dim * self.dtype.itemsize)
    if not self.count:
      return np.zeros((0, self.dim), self.dtype)
    return np.memmap(self.path, self.dtype, mode="r", shape=(self.count, self.dim))


@dataclasses.dataclass
class Split:
  """One host's share of a split's features: `features` [n, d] (memory-mapped), `labels` [n],
  and the records skipped, by reason."""

  features: np.ndarray
  labels: np.ndarray
  skipped: dict
  moments: RunningMoments


def _local_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))


def feature_encoder(objective, k: int):
  """(params, images [B, S, S, 3]) -> float32 features [B, d] (`encoder_features`), jitted;
  `run_probe` replicates the parameters and splits each chunk over this process's devices."""
  return jax.jit(lambda params, x: encoder_features(*objective.encode(params, x), k)
                 .astype(jnp.float32))


def extract(encode, params, examples, path: str, capacity: int, dim: int, dtype: str,
            chunk: int, num_classes: int, desc: str = "features") -> Split:
  """Encodes the chunks of `examples` (`stream_examples`) and writes their features to a
  `FeatureFile` at `path`, with the moments of the stored (cast) values.

  Args:
    encode: (params, images [chunk, ...]) -> features [chunk, dim] (`feature_encoder`).
    params: the encoder's parameters, placed for `encode`.
    examples: iterable of (images [m, ...] or None, labels [m], skipped) with m <= chunk.
    path: the feature file.
    capacity: the most rows (the records of the share).
    dim: d, the feature size.
    dtype: "float16" or "float32", the stored type.
    chunk: the encoder's batch (shorter chunks are padded: one compilation).
    num_classes: labels must lie in [0, num_classes).
    desc: the progress bar's label.

  Returns:
    The `Split`.

  Raises:
    ProbeDataError: for a label outside [0, num_classes) or features that are not finite
      once stored (float16 overflow, or a diverged encoder).
  """
  out, labels = FeatureFile(path, capacity, dim, dtype), []
  stats, skipped = RunningMoments(dim), collections.Counter()
  sharding = jax.sharding.NamedSharding(_local_mesh(), P("data"))
  with progress.bar(capacity, desc, unit="record") as bar:
    for images, chunk_labels, chunk_skipped in examples:
      skipped.update(chunk_skipped)
      bar.update(len(chunk_labels) + sum(chunk_skipped.values()))
      if not len(chunk_labels):
        continue
      bad = (chunk_labels < 0) | (chunk_labels >= num_classes)
      if bad.any():
        raise ProbeDataError(f"label {int(chunk_labels[bad][0])} is outside "
                             f"[0, {num_classes}) (num_classes).")
      padded = jax.device_put(pad_rows(images, chunk), sharding)
      with np.errstate(over="ignore"):  # checked below
        feats = np.asarray(encode(params, padded))[:len(images)].astype(dtype)
      if not np.all(np.isfinite(feats)):
        raise ProbeDataError(f"features are not finite as {dtype} (too large for float16? "
                             "set feature_dtype='float32').")
      out.append(feats)
      stats.add(feats)
      labels.append(chunk_labels)
  labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
  return Split(out.close(), labels, dict(skipped), stats)


# -- the head -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadOptions:
  """The head's training: MAE's linear-probing protocol by default."""

  epochs: int = 90
  warmup_epochs: int = 10
  batch_size: int = 16_384
  base_learning_rate: float = 0.1
  optimizer: str = "lars"
  momentum: float = 0.9
  weight_decay: float = 0.0
  trust_coefficient: float = 0.001
  bn_eps: float = 1e-6
  seed: int = 0

  @property
  def learning_rate(self) -> float:
    """The peak learning rate: base_learning_rate x batch_size / 256."""
    return self.base_learning_rate * self.batch_size / 256


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int):
  """step -> learning rate: linear from 0 over `warmup_steps`, then a half cosine from `peak`
  to 0 at `total_steps` (MAE's schedule, per step)."""

  def schedule(step):
    warm = peak * step / max(warmup_steps, 1)
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cosine = 0.5 * peak * (1 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def make_optimizer(options: HeadOptions, steps_per_epoch: int) -> optax.GradientTransformation:
  """LARS (or SGD) with momentum, linear warm-up over `warmup_epochs` then a half cosine to 0.

  As MAE's LARS, the weight decay and the trust ratio apply to the weight matrix only, not the
  bias; the trust ratio is 1 where the weight or its update is zero.
  """
  schedule = warmup_cosine(options.learning_rate, options.warmup_epochs * steps_per_epoch,
                           options.epochs * steps_per_epoch)
  matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if options.optimizer == "lars":
    return optax.lars(schedule, weight_decay=options.weight_decay,
                      weight_decay_mask=matrices, trust_coefficient=options.trust_coefficient,
                      trust_ratio_mask=matrices, momentum=options.momentum)
  return optax.chain(optax.add_decayed_weights(options.weight_decay, matrices),
                     optax.sgd(schedule, momentum=options.momentum))


def init_head(dim: int, num_classes: int, seed: int = 0) -> dict:
  """{w [d, C] normal with std 0.01 truncated at 2 std (MAE's), b [C] zeros}, as numpy."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, num_classes))
  while np.any(outside := np.abs(w) > 2):
    w[outside] = rng.normal(size=int(outside.sum()))
  return dict(w=(0.01 * w).astype(np.float32), b=np.zeros(num_classes, np.float32))


def head_logits(head, x, mean, var, eps: float):
  """The head: non-affine BatchNorm with fixed statistics (mean, var), then linear."""
  x = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps)
  return x @ head["w"] + head["b"]


def head_loss(head, x, y, mean, var, eps: float):
  """Mean softmax cross-entropy of the head on a batch."""
  logits = head_logits(head, x, mean, var, eps)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_head(train: Split, mean: np.ndarray, var: np.ndarray, num_classes: int,
               options: HeadOptions, hosts: Hosts = Hosts(), devices=None,
               desc: str = "head") -> tuple[dict, list[float]]:
  """Trains the head on the features of `train` (this host's share) for `options.epochs`.

  Each step's global batch is `batch_size / hosts.count` rows of every host's share
  (`epoch_batches`), assembled into one array over `devices` (default: this process's
  devices, or all of JAX's devices when several hosts share the work); the mean loss over it
  is differentiated, so the gradient is the global batch's. The next batch is read from disk
  while the current step runs.

  Returns:
    (the head {w, b} as numpy, the mean training loss of each epoch).
  """
  counts = hosts.gather(np.asarray([len(train.labels)], np.int64))[:, 0]
  local_batch = options.batch_size // hosts.count
  steps = steps_per_epoch(counts, options.batch_size)
  if steps < 1:
    raise ProbeDataError(f"batch_size={options.batch_size} exceeds the usable training "
                         f"records ({int(sum(counts))} over {hosts.count} host(s)).")
  if devices is None:
    devices = jax.devices() if hosts.count > 1 else jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  rows = jax.sharding.NamedSharding(mesh, P("data"))
  replicated = jax.sharding.NamedSharding(mesh, P())
  optimizer = make_optimizer(options, steps)
  head = jax.device_put(init_head(train.features.shape[1], num_classes, options.seed),
                        replicated)
  opt_state = jax.device_put(optimizer.init(head), replicated)
  mean, var = (jax.device_put(np.asarray(v, np.float32), replicated) for v in (mean, var))

  @jax.jit
  def step(head, opt_state, x, y, mean, var):
    loss, grads = jax.value_and_grad(head_loss)(head, x, y, mean, var, options.bn_eps)
    updates, opt_state = optimizer.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, loss

  read = lambda idx: (np.asarray(train.features[idx]), train.labels[idx])
  epoch_losses = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, progress.bar(
      options.epochs * steps, desc, unit="step") as bar:
    for epoch in range(options.epochs):
      batches = epoch_batches(len(train.labels), local_batch, steps, options.seed, epoch,
                              hosts.index)
      upcoming, losses = pool.submit(read, batches[0]), []
      for s in range(steps):
        x, y = upcoming.result()
        if s + 1 < steps:
          upcoming = pool.submit(read, batches[s + 1])
        x, y = (jax.make_array_from_process_local_data(rows, v) for v in (x, y))
        head, opt_state, loss = step(head, opt_state, x, y, mean, var)
        losses.append(loss)
        bar.update(1)
      epoch_losses.append(float(np.mean(jax.device_get(losses))))
  # Replicated: every process holds the whole head (no collective needed to read it).
  return jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data), head), epoch_losses


def topk_counts(head, split: Split, mean, var, eps: float, ks=(1, 5),
                chunk: int = 4096) -> np.ndarray:
  """int [len(ks) + 1]: the rows of `split` whose label is among the head's top k logits, for
  each k (a tie with the label's logit counts for it), then the rows counted; on this
  process's first device, chunk by chunk from disk."""
  device = jax.local_devices()[0]
  head, mean, var = jax.device_put((head, np.asarray(mean, np.float32),
                                    np.asarray(var, np.float32)), device)

  @jax.jit
  def counts(head, mean, var, x, y, valid):
    logits = head_logits(head, x, mean, var, eps)
    rank = jnp.sum(logits > jnp.take_along_axis(logits, y[:, None], 1), axis=1)
    return jnp.stack([jnp.sum(valid & (rank < k)) for k in ks])

  total = np.zeros(len(ks), np.int64)
  n = len(split.labels)
  for start in range(0, n, chunk):
    x = np.asarray(split.features[start:start + chunk])
    m = len(x)
    total += np.asarray(counts(head, mean, var, pad_rows(x, chunk),
                               pad_rows(split.labels[start:start + m], chunk),
                               pad_rows(np.ones(m, bool), chunk)))
  return np.concatenate([total, [n]])


# -- the evaluator --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeSetup:
  """What one evaluation needs besides the parameters (checked by `build`)."""

  train_source: object
  test_source: object
  train_size: int
  test_size: int
  num_classes: int
  image_size: int
  label_key: str
  crop_fraction: float
  encode_batch: int
  workers: int
  feature_dtype: str
  feature_cache_dir: str | None
  keep_features: bool
  head: HeadOptions


def run_probe(setup: ProbeSetup, encode, params, normalize, hosts: Hosts = Hosts(),
              name: str = "probe") -> dict:
  """Extracts this host's share of both splits' features, trains the head, scores it.

  Returns:
    {top1, top5 (more than 5 classes), train_loss (the last epoch's mean), train_examples,
    test_examples, skipped, skipped/train, skipped/test, skipped/<reason>}, summed over hosts.
  """
  params = jax.device_put(params, jax.sharding.NamedSharding(_local_mesh(), P()))
  chunk = -(-setup.encode_batch // jax.local_device_count()) * jax.local_device_count()
  probe = jax.ShapeDtypeStruct((chunk, setup.image_size, setup.image_size, 3), jnp.float32)
  dim = jax.eval_shape(encode, params, probe).shape[1]
  shares = {split: host_share(size, hosts.index, hosts.count)
            for split, size in (("train", setup.train_size), ("test", setup.test_size))}
  itemsize = np.dtype(setup.feature_dtype).itemsize
  if setup.feature_cache_dir:
    os.makedirs(setup.feature_cache_dir, exist_ok=True)
  directory = tempfile.mkdtemp(prefix=f"dpvl-{name}-", dir=setup.feature_cache_dir or None)
  try:
    need = sum(stop - start for start, stop in shares.values()) * dim * itemsize
    free = shutil.disk_usage(directory).free
    if need > free:
      raise ProbeDataError(f"the features need {need / 2**30:.1f} GiB on disk, {directory} "
                           f"has {free / 2**30:.1f} GiB free (feature_cache_dir).")
    splits = {}
    for split, source in (("train", setup.train_source), ("test", setup.test_source)):
      start, stop = shares[split]
      read = lambda i, source=source: read_example(
          source, i, setup.image_size, setup.label_key, normalize, setup.crop_fraction)
      splits[split] = extract(
          encode, params, stream_examples(read, start, stop, chunk, setup.workers),
          os.path.join(directory, f"{split}-host{hosts.index}.{setup.feature_dtype}"),
          stop - start, dim, setup.feature_dtype, chunk, setup.num_classes,
          desc=f"{name}: {split} features")
    train, test = splits["train"], splits["test"]
    np.save(os.path.join(directory, f"train-host{hosts.index}-labels.npy"), train.labels)
    n, mean, var = combine_moments(*(hosts.gather(np.asarray(v, dtype)) for v, dtype in (
        ([train.moments.count], np.int64), (train.moments.mean, np.float32),
        (train.moments.var, np.float32))))
    head, losses = train_head(train, mean, var, setup.num_classes, setup.head, hosts,
                              desc=f"{name}: head")
    ks = (1, 5) if setup.num_classes > 5 else (1,)
    counts = sum_counts(hosts.gather(topk_counts(head, test, mean, var, setup.head.bn_eps, ks)))
  finally:
    if not setup.keep_features:
      shutil.rmtree(directory, ignore_errors=True)
  skips = merge_skips(hosts.gather_objects(dict(train=train.skipped, test=test.skipped)))
  out = dict(top1=counts[0] / max(counts[-1], 1))
  if len(ks) > 1:
    out["top5"] = counts[1] / max(counts[-1], 1)
  out.update(train_loss=losses[-1], train_examples=n, test_examples=int(counts[-1]),
             skipped=sum(skips["train"].values()) + sum(skips["test"].values()),
             **{"skipped/train": sum(skips["train"].values()),
                "skipped/test": sum(skips["test"].values())},
             **{f"skipped/{r}": skips["train"].get(r, 0) + skips["test"].get(r, 0)
                for r in sorted({*skips["train"], *skips["test"]})})
  return {k: float(v) if isinstance(v, (float, np.floating)) else int(v)
          for k, v in out.items()}


def merge_skips(rows: list[dict]) -> dict:
  """Every host's {"train": {reason: n}, "test": {reason: n}} -> their sums (hosts may skip
  for different reasons)."""
  return {split: dict(sum((collections.Counter(row[split]) for row in rows),
                          collections.Counter())) for split in ("train", "test")}


def _positive(value, what: str, minimum=1):
  if not value >= minimum:
    raise ConfigError(f"{what} must be >= {minimum}, got {value}.")
  return value


def head_options(config, name: str) -> HeadOptions:
  """The head's training fields of `config.evals.<name>`, checked (ConfigError names them)."""
  field = lambda f, d: get_field(config, f"evals.{name}.{f}", d)
  prefix = f"config.evals.{name}"
  defaults = HeadOptions()
  options = HeadOptions(**{f.name: type(getattr(defaults, f.name))(field(
      f.name, getattr(defaults, f.name))) for f in dataclasses.fields(HeadOptions)})
  _positive(options.epochs, f"{prefix}.epochs")
  _positive(options.batch_size, f"{prefix}.batch_size")
  if not 0 <= options.warmup_epochs <= options.epochs:
    raise ConfigError(f"{prefix}.warmup_epochs={options.warmup_epochs} must be in [0, "
                      f"epochs={options.epochs}].")
  if options.optimizer not in OPTIMIZERS:
    raise ConfigError(f"{prefix}.optimizer must be one of {OPTIMIZERS}, got "
                      f"{options.optimizer!r}.")
  if not (options.base_learning_rate > 0 and 0 <= options.momentum < 1
          and options.weight_decay >= 0 and options.trust_coefficient > 0
          and options.bn_eps > 0):
    raise ConfigError(f"{prefix}: base_learning_rate, trust_coefficient and bn_eps must be "
                      "positive, momentum in [0, 1), weight_decay >= 0.")
  return options


def _split_size(size: int, source, what: str) -> int:
  """`size` records of `source` (0: all), checked."""
  size = int(size) or len(source)
  if not 1 <= size <= len(source):
    raise ConfigError(f"{what}={size} must be in [1, {len(source)}] (the split's records; 0: "
                      "all of them).")
  return size


def build(config, name: str, objective):
  """params -> {top1, top5, train_loss, ..., skipped}: the probe of `config.evals.<name>`.

  Only the sources are opened here; each call streams both splits through the encoder,
  trains a new head and deletes the features (unless `keep_features`).

  Raises:
    ConfigError: for a bad field or a source that cannot be opened.
  """
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  prefix = f"config.evals.{name}"
  k = feature_blocks(config, name)
  head = head_options(config, name)
  split = bool(field("split_over_hosts", False))
  hosts = process_hosts(split)
  opened = {}
  for key in ("data", "test_data"):
    data = field(key)
    try:
      opened[key] = sources.build_source(data)
    except (ValueError, AttributeError, KeyError) as e:
      raise ConfigError(f"{prefix}.{key}: {e}") from None
  train_size = _split_size(field("train_size", 0), opened["data"], f"{prefix}.train_size")
  test_size = _split_size(field("test_size", 0), opened["test_data"], f"{prefix}.test_size")
  num_classes = field("num_classes", 0) or getattr(opened["data"], "num_classes", 0)
  if not num_classes or int(num_classes) < 2:
    raise ConfigError(f"{prefix}.num_classes must be >= 2 (the training source does not say "
                      f"how many classes it has), got {num_classes!r}.")
  width = jax.local_device_count()
  if head.batch_size % (hosts.count * width):
    raise ConfigError(f"{prefix}.batch_size={head.batch_size} must be divisible by the "
                      f"{hosts.count * width} devices that share the head's batches.")
  if head.batch_size > train_size:
    raise ConfigError(f"{prefix}.batch_size={head.batch_size} exceeds the {train_size} "
                      "training records.")
  crop_fraction = float(field("crop_fraction", 1.0))
  if not 0 < crop_fraction <= 1:
    raise ConfigError(f"{prefix}.crop_fraction must be in (0, 1], got {crop_fraction}.")
  feature_dtype = str(field("feature_dtype", "float16"))
  if feature_dtype not in FEATURE_DTYPES:
    raise ConfigError(f"{prefix}.feature_dtype must be one of {FEATURE_DTYPES}, got "
                      f"{feature_dtype!r}.")
  setup = ProbeSetup(
      train_source=opened["data"], test_source=opened["test_data"], train_size=train_size,
      test_size=test_size, num_classes=int(num_classes), image_size=int(objective.image_size),
      label_key=str(field("label_key", "label")), crop_fraction=crop_fraction,
      encode_batch=_positive(int(field("encode_batch", 256)), f"{prefix}.encode_batch"),
      workers=_positive(int(field("workers", 16)), f"{prefix}.workers"),
      feature_dtype=feature_dtype, feature_cache_dir=field("feature_cache_dir", None) or None,
      keep_features=bool(field("keep_features", False)), head=head)
  encode = feature_encoder(objective, k)

  def evaluate(params):
    if hosts.count > 1 and not all(getattr(a, "is_fully_addressable", True)
                                   for a in jax.tree.leaves(params)):
      params = hosts_lib.whole(params)
    try:
      return run_probe(setup, encode, params, objective.normalize, hosts, name)
    except ProbeDataError as e:
      raise ConfigError(f"{prefix}: {e}") from None

  return evaluate
