"""Turns a step's selection (indices + mask) into a padded batch of prepared examples.

Records are read from any random-access source (grain's `RandomAccessDataSource` protocol:
`__len__`, `__getitem__`) and prepared by the objective, either in a thread pool or, with
`processes > 0`, in worker processes (spawned; each gets the source and `prepare` once, by
cloudpickle), so image decoding runs beside the training step: `train` prepares the next
step's batch while the device runs the current one.

A record that cannot be read or prepared is skipped and counted by reason (`errors.BadRecord`
carries it; any other failure counts as `unreadable_record` when reading and `bad_record` when
preparing): its slot becomes padding. That is private, because whether a record is skipped
depends on that record only. The batch is the same whichever way it was made.
"""

import collections
import concurrent.futures
import dataclasses
import multiprocessing
from typing import Any, Callable, Mapping

import cloudpickle
import jax
import numpy as np

from dpvl.data import errors
from dpvl.privacy.sampling import Selection


@dataclasses.dataclass
class Batch:
  examples: dict          # name -> np.ndarray [num_microbatches, microbatch_size, ...]
  mask: np.ndarray        # bool [num_microbatches, microbatch_size]
  skipped: collections.Counter  # reason -> count


def prepared_example(source, prepare, index: int):
  """(prepared example, None) or (None, reason) for record `index` of `source`."""
  try:
    record = source[int(index)]
  except errors.BadRecord as e:
    return None, e.reason
  except Exception:  # pylint: disable=broad-except
    return None, errors.UNREADABLE_RECORD
  try:
    return prepare(record), None
  except errors.BadRecord as e:
    return None, e.reason
  except Exception:  # pylint: disable=broad-except
    return None, errors.BAD_RECORD


_WORKER = {}  # in a worker process: its source and prepare


def _init_worker(payload: bytes) -> None:
  _WORKER["source"], _WORKER["prepare"] = cloudpickle.loads(payload)


def _worker_example(index: int):
  return prepared_example(_WORKER["source"], _WORKER["prepare"], index)


class BatchLoader:
  """Reads, prepares and pads the examples of a selection."""

  def __init__(self, source, prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]],
               example_spec: Mapping[str, jax.ShapeDtypeStruct], num_microbatches: int,
               microbatch_size: int, workers: int = 4, processes: int = 0):
    self._source = source
    self._prepare = prepare
    self._spec = example_spec
    self._shape = (num_microbatches, microbatch_size)
    self._processes = int(processes)
    if self._processes > 0:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self._processes, mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker, initargs=(cloudpickle.dumps((source, prepare)),))
    else:
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

  def _examples(self, indices: np.ndarray):
    if self._processes > 0:
      chunk = max(1, len(indices) // (4 * self._processes))
      return self._pool.map(_worker_example, indices.tolist(), chunksize=chunk)
    return self._pool.map(lambda i: prepared_example(self._source, self._prepare, i), indices)

  def load(self, selection: Selection) -> Batch:
    """The padded batch of `selection`, shaped [num_microbatches, microbatch_size, ...]."""
    capacity = self._shape[0] * self._shape[1]
    if selection.mask.size != capacity:
      raise ValueError(f"selection has {selection.mask.size} slots, the batch {capacity}.")
    examples = {name: np.zeros((capacity, *s.shape), s.dtype) for name, s in self._spec.items()}
    mask = selection.mask.copy()
    skipped = collections.Counter()
    slots = np.flatnonzero(mask)
    for slot, (example, reason) in zip(slots, self._examples(selection.indices[slots])):
      if reason is not None:
        mask[slot] = False
        skipped[reason] += 1
        continue
      for name, value in example.items():
        examples[name][slot] = value
    reshape = lambda x: x.reshape(*self._shape, *x.shape[1:])
    return Batch({k: reshape(v) for k, v in examples.items()}, reshape(mask), skipped)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
