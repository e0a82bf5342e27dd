"""The batches of a run's steps, each prepared on the host while the device runs the one before.

`BatchStream(fetch, start, stop)` calls `fetch(step)` for steps start..stop-1, in order, in one
worker thread: it starts on the first at construction and on step t+1 as soon as step t is
handed out, so the host reads and prepares the next batch while the device trains on this one.
`fetch` is the caller's (in `train`: the step's selection and `loader.BatchLoader.load` of it);
its result is handed out as is and an exception it raises is raised at the consumer.
"""

import concurrent.futures
import time
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class BatchStream(Generic[T]):
  """Iterates over (step, fetch(step)) for steps [start, stop), one step fetched ahead.

  Single use; `close()` (or leaving a `with` block) stops it. `wait_seconds` is the time the
  consumer blocked on a fetch so far: `train` logs it as `data_wait_seconds`.
  """

  def __init__(self, fetch: Callable[[int], T], start: int, stop: int):
    """Starts fetching step `start` (if `start < stop`).

    Args:
      fetch: fetch(step) -> the batch of `step` (any value); called in the worker thread.
      start: the first step.
      stop: the step after the last.
    """
    self._fetch = fetch
    self._stop = stop
    self._step = start  # the step of `self._pending`
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="dpvl-batch-stream")
    self._pending = self._executor.submit(fetch, start) if start < stop else None
    self._wait_seconds = 0.0

  @property
  def wait_seconds(self) -> float:
    """Seconds the consumer has waited for batches so far."""
    return self._wait_seconds

  def __iter__(self) -> Iterator[tuple[int, T]]:
    return self

  def __next__(self) -> tuple[int, T]:
    """The next (step, batch); submits the fetch of the step after before returning it."""
    if self._pending is None:
      raise StopIteration
    pending, step = self._pending, self._step
    self._pending = None  # after a failed fetch the stream ends
    waited = time.perf_counter()
    try:
      batch = pending.result()
    finally:
      self._wait_seconds += time.perf_counter() - waited
    self._step = step + 1
    if self._step < self._stop:
      self._pending = self._executor.submit(self._fetch, self._step)
    return step, batch

  def close(self) -> None:
    """Cancels the fetch not yet started and ends the stream; does not wait for a running one
    (it finishes in the background and its result is dropped). Idempotent."""
    if self._pending is not None:
      self._pending.cancel()
      self._pending = None
    self._executor.shutdown(wait=False, cancel_futures=True)

  def __enter__(self) -> "BatchStream[T]":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
