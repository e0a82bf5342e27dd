"""Turns a step's selection (indices + mask) into a padded batch of prepared examples.

Records are read from any random-access source (grain's `RandomAccessDataSource` protocol:
`__len__`, `__getitem__`) and prepared by the objective in a thread pool; the next step's batch
can be prepared while the device runs the current one. A record that cannot be read or prepared is
skipped and counted by reason: its slot becomes padding. That is private, because whether a
record is skipped depends on that record only.
"""

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dpvl.privacy.sampling import Selection


@dataclasses.dataclass
class Batch:
  examples: dict          # name -> np.ndarray [num_microbatches, microbatch_size, ...]
  mask: np.ndarray        # bool [num_microbatches, microbatch_size]
  skipped: collections.Counter  # reason -> count


class BatchLoader:
  """Reads, prepares and pads the examples of a selection."""

  def __init__(self, source, prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]],
               example_spec: Mapping[str, jax.ShapeDtypeStruct], num_microbatches: int,
               microbatch_size: int, workers: int = 4):
    self._source = source
    self._prepare = prepare
    self._spec = example_spec
    self._shape = (num_microbatches, microbatch_size)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

  def _example(self, index: int):
    try:
      record = self._source[int(index)]
    except Exception as e:  # pylint: disable=broad-except
      return None, f"unreadable record ({type(e).__name__})"
    try:
      return self._prepare(record), None
    except Exception as e:  # pylint: disable=broad-except
      return None, f"bad record ({type(e).__name__}: {e})"[:120]

  def load(self, selection: Selection) -> Batch:
    """The padded batch of `selection`, shaped [num_microbatches, microbatch_size, ...]."""
    capacity = self._shape[0] * self._shape[1]
    if selection.mask.size != capacity:
      raise ValueError(f"selection has {selection.mask.size} slots, the batch {capacity}.")
    examples = {name: np.zeros((capacity, *s.shape), s.dtype) for name, s in self._spec.items()}
    mask = selection.mask.copy()
    skipped = collections.Counter()
    slots = np.flatnonzero(mask)
    for slot, (example, reason) in zip(
        slots, self._pool.map(self._example, selection.indices[slots])):
      if reason is not None:
        mask[slot] = False
        skipped[reason] += 1
        continue
      for name, value in example.items():
        examples[name][slot] = value
    reshape = lambda x: x.reshape(*self._shape, *x.shape[1:])
    return Batch({k: reshape(v) for k, v in examples.items()}, reshape(mask), skipped)
