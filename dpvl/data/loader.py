"""Turns a step's selection (indices + mask) into a padded batch of prepared examples.

Records are read from any random-access source (grain's `RandomAccessDataSource` protocol:
`__len__`, `__getitem__`) in a thread pool or, with `processes > 0`, in worker processes
(spawned; each gets the source once, by cloudpickle: image decoding runs there), then prepared
by the objective in the thread pool; with an augmentation (`data.crop = "random_resized"`,
`augmentation`), each image is cropped afresh for the step it is drawn at, seeded by (data seed,
record, step). `stream.BatchStream` loads the next step's batch while
the device runs the current one.

A record that cannot be read or prepared is skipped and counted by reason (`errors.BadRecord`
carries it; any other failure counts as `unreadable_record` when reading and `bad_record` when
preparing): its slot becomes padding. That is private, because whether a record is skipped
depends on that record only. The batch is the same whichever way it was made.
"""

import collections
import concurrent.futures
import dataclasses
import multiprocessing
from typing import Any, Callable, Mapping, Protocol

import cloudpickle
import jax
import numpy as np

from dpvl import config as config_lib
from dpvl.data import errors
from dpvl.data import transforms
from dpvl.parallel import mesh as mesh_lib


class Selection(Protocol):
  """A step's selection as the loader reads it (e.g. `dpvl.privacy.sampling.Selection`)."""

  @property
  def indices(self) -> np.ndarray:
    """int [capacity]: the record of each slot (anything where `mask` is False)."""

  @property
  def mask(self) -> np.ndarray:
    """bool [capacity]: which slots hold a record; the others are padding."""


@dataclasses.dataclass
class Batch:
  examples: dict          # name -> np.ndarray [num_microbatches, microbatch_size, ...]
  mask: np.ndarray        # bool [num_microbatches, microbatch_size]
  skipped: collections.Counter  # reason -> count


def augmentation(data_cfg, image_size: int) -> transforms.Augmentation | None:
  """The per-draw augmentation `config.data` asks for: RandomResizedCrop (`data.crop_scale`,
  default (0.2, 1)) and a horizontal flip (`data.flip`, default True) when `data.crop` is
  "random_resized"; None (records used as they are) for "center"."""
  field = lambda name, default=None: config_lib.get_field(data_cfg, name, default)
  if field("crop", "center") != "random_resized":
    return None
  try:
    return transforms.Augmentation(image_size, int(field("seed", 0)),
                                   tuple(field("crop_scale", (0.2, 1.0))),
                                   bool(field("flip", True)))
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def augment_record(augment, record, index: int, step: int):
  """`record` with its image drawn for `step` by `augment` (unchanged when `augment` is None);
  `index` is the record's index in its source."""
  if augment is None:
    return record
  return {**record, "image": augment(record["image"], index, step)}


def read_record(source, index: int):
  """(record, None) or (None, reason) for record `index` of `source`."""
  try:
    return source[int(index)], None
  except errors.BadRecord as e:
    return None, e.reason
  except Exception:  # pylint: disable=broad-except
    return None, errors.UNREADABLE_RECORD


def prepare_record(prepare, read):
  """(prepared example, None) or (None, reason) for the result `read` of `read_record`."""
  record, reason = read
  if reason is not None:
    return None, reason
  try:
    return prepare(record), None
  except errors.BadRecord as e:
    return None, e.reason
  except Exception:  # pylint: disable=broad-except
    return None, errors.BAD_RECORD


_WORKER = {}  # in a worker process: its source


def _init_worker(payload: bytes) -> None:
  _WORKER["source"] = cloudpickle.loads(payload)


def _worker_read(index: int):
  return read_record(_WORKER["source"], index)


class BatchLoader:
  """Reads, prepares and pads the examples of a selection."""

  def __init__(self, source, prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]],
               example_spec: Mapping[str, jax.ShapeDtypeStruct], num_microbatches: int,
               microbatch_size: int, workers: int = 4, processes: int = 0, host: int = 0,
               num_hosts: int = 1, augment: transforms.Augmentation | None = None):
    """`augment` (`augmentation`) redraws each image for the step it is loaded at, before
    `prepare`. With `num_hosts` > 1, `load` reads only host `host`'s share of each selection
    (`mesh.host_slots`) and returns it shaped [num_microbatches, microbatch_size /
    num_hosts, ...]: the rows of the global batch that this host's devices hold."""
    self._source = source
    self._prepare = prepare
    self._augment = augment
    self._spec = example_spec
    self._capacity = num_microbatches * microbatch_size
    self._slots = mesh_lib.host_slots(num_microbatches, microbatch_size, host, num_hosts)
    self._shape = (num_microbatches, microbatch_size // num_hosts)
    self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    self._processes, self._chunks = None, 4 * max(1, processes)
    if processes > 0:
      self._processes = concurrent.futures.ProcessPoolExecutor(
          processes, mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker, initargs=(cloudpickle.dumps(source),))

  def _examples(self, indices: np.ndarray, step: int):
    draw = lambda index: lambda record: self._prepare(
        augment_record(self._augment, record, index, step))
    prepare = lambda index, read: prepare_record(draw(index), read)
    if self._processes is None:
      return self._threads.map(lambda i: prepare(i, read_record(self._source, i)), indices)
    reads = self._processes.map(_worker_read, indices.tolist(),
                                chunksize=max(1, len(indices) // self._chunks))
    return self._threads.map(prepare, indices, reads)

  def load(self, selection: Selection, step: int = 0) -> Batch:
    """The padded batch of `selection` (this host's share), [num_microbatches, width, ...],
    its images drawn for `step`."""
    if selection.mask.size != self._capacity:
      raise ValueError(f"selection has {selection.mask.size} slots, the batch "
                       f"{self._capacity}.")
    indices = selection.indices[self._slots]
    mask = selection.mask[self._slots]  # fancy indexing copies: the input stays unchanged
    examples = {name: np.zeros((mask.size, *s.shape), s.dtype)
                for name, s in self._spec.items()}
    skipped = collections.Counter()
    slots = np.flatnonzero(mask)
    for slot, (example, reason) in zip(slots, self._examples(indices[slots], step)):
      if reason is not None:
        mask[slot] = False
        skipped[reason] += 1
        continue
      for name, value in example.items():
        examples[name][slot] = value
    reshape = lambda x: x.reshape(*self._shape, *x.shape[1:])
    return Batch({k: reshape(v) for k, v in examples.items()}, reshape(mask), skipped)

  def close(self) -> None:
    self._threads.shutdown(wait=False, cancel_futures=True)
    if self._processes is not None:
      self._processes.shutdown(wait=False, cancel_futures=True)
