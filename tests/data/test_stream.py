"""The prefetching batch stream: order, one step of overlap, close, errors, wait time."""

import os
import subprocess
import sys
import threading

import pytest

from dpvl.data import stream as stream_lib

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TIMEOUT = 10  # seconds; only reached when a test fails


class _Fetcher:
  """fetch(step) -> 10 * step; records the steps started and can hold a step until released."""

  def __init__(self, hold=(), fail_at=None):
    self.started = [threading.Event() for _ in range(10)]  # made here: shared by two threads
    self.release = [threading.Event() for _ in range(10)]
    self.calls = []
    self._hold, self._fail_at = set(hold), fail_at

  def __call__(self, step):
    self.calls.append(step)
    self.started[step].set()
    if step in self._hold:
      assert self.release[step].wait(TIMEOUT)
    if step == self._fail_at:
      raise ValueError(f"unreadable batch {step}")
    return 10 * step


def test_yields_each_step_in_order():
  fetch = _Fetcher()
  with stream_lib.BatchStream(fetch, 3, 7) as stream:
    assert list(stream) == [(3, 30), (4, 40), (5, 50), (6, 60)]
  assert fetch.calls == [3, 4, 5, 6]
  with stream_lib.BatchStream(fetch, 7, 7) as empty:  # nothing left to train
    assert not list(empty)
  assert fetch.calls == [3, 4, 5, 6]


def test_the_next_step_is_fetched_while_the_consumer_holds_this_one():
  fetch = _Fetcher()
  with stream_lib.BatchStream(fetch, 0, 4) as stream:
    assert fetch.started[0].wait(TIMEOUT)  # from construction on, before anyone asks
    for step, _ in stream:
      if step + 1 < 4:
        assert fetch.started[step + 1].wait(TIMEOUT)  # step+1 started before step is done
      assert not fetch.started[step + 2].is_set()  # one step ahead, no more
  assert fetch.calls == [0, 1, 2, 3]


def test_close_ends_the_stream_without_waiting_for_the_running_fetch():
  fetch = _Fetcher(hold=[1])
  stream = stream_lib.BatchStream(fetch, 0, 5)
  assert next(stream) == (0, 0)
  assert fetch.started[1].wait(TIMEOUT)
  stream.close()  # returns although fetch(1) is still held
  with pytest.raises(StopIteration):
    next(stream)
  stream.close()  # idempotent
  fetch.release[1].set()
  assert fetch.calls == [0, 1]  # nothing was fetched after the close


def test_leaving_the_with_block_closes_the_stream():
  fetch = _Fetcher()
  with stream_lib.BatchStream(fetch, 0, 5) as stream:
    assert next(stream) == (0, 0)
  with pytest.raises(StopIteration):
    next(stream)


def test_an_exception_in_fetch_is_raised_at_the_consumer():
  fetch = _Fetcher(fail_at=2)
  with stream_lib.BatchStream(fetch, 0, 5) as stream:
    assert next(stream) == (0, 0) and next(stream) == (1, 10)
    with pytest.raises(ValueError, match="unreadable batch 2"):
      next(stream)
    with pytest.raises(StopIteration):  # and the stream ends there
      next(stream)
  assert fetch.calls == [0, 1, 2]


def test_wait_seconds_counts_the_time_the_consumer_blocked():
  fetch = _Fetcher(hold=[0])
  with stream_lib.BatchStream(fetch, 0, 2) as stream:
    assert stream.wait_seconds == 0
    timer = threading.Timer(0.2, fetch.release[0].set)
    timer.start()
    next(stream)
    assert stream.wait_seconds >= 0.15
    timer.join()


def test_the_data_package_does_not_import_privacy():
  script = ("import sys\n"
            "from dpvl.data import loader, stream\n"
            "assert not [m for m in sys.modules if m.startswith('dpvl.privacy')], "
            "sorted(m for m in sys.modules if m.startswith('dpvl.'))\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
