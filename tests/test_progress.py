"""Progress bars: quiet off a terminal, a count, a rate and an ETA on one; the evaluators' and
the converter's loops give the same results through them."""

import io
import re
import time

import numpy as np

from dpvl import progress
from dpvl.evaluate import linear_probe


class FakeTerminal(io.StringIO):
  """A stream that says it is a terminal."""

  def isatty(self):
    return True


def test_quiet_off_a_terminal():
  stream = io.StringIO()
  assert list(progress.track(range(5), desc="batches", file=stream)) == [0, 1, 2, 3, 4]
  with progress.bar(3, "records", file=stream) as bar:
    bar.update(3)
  assert stream.getvalue() == ""


def test_a_terminal_shows_count_rate_and_eta():
  stream = FakeTerminal()
  items = []
  for item in progress.track(range(4), desc="features", unit="batch", file=stream,
                             mininterval=0):
    time.sleep(0.01)
    items.append(item)
  assert items == [0, 1, 2, 3]
  lines = [line for line in stream.getvalue().split("\r") if "features" in line]
  # e.g. "features:  50%|#####     | 2/4 [00:00<00:00, 98.2batch/s]": done/total, then the
  # time so far, the time left (the ETA) and the rate.
  shown = re.compile(r"features: +\d+%.*\| 2/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+batch/s\]")
  assert any(shown.search(line) for line in lines), lines


def test_a_bar_without_total_counts_and_rates():
  stream = FakeTerminal()
  with progress.bar(desc="shards", unit="shard", file=stream, mininterval=0) as bar:
    for _ in range(3):
      time.sleep(0.01)
      bar.update(1)
  assert re.search(r"shards: 3shard \[\d\d:\d\d, +[\d.]+shard/s\]", stream.getvalue())


def test_chunked_apply_is_unchanged_by_its_bar(monkeypatch):
  stream = FakeTerminal()
  monkeypatch.setattr("sys.stderr", stream)
  apply = linear_probe.chunked(lambda params, x: x * params, chunk=4, desc="features")
  x = np.arange(10, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(apply(2.0, x), 2 * x)
  assert re.search(r"features: .*\| 0/3 ", stream.getvalue())  # three chunks of 4 rows
