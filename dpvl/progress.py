"""Progress bars for long loops: a count, a rate and an ETA on stderr, while it is a terminal.

Off a terminal (a log file, a pipe, a batch job's output) nothing is written, so logs keep
only their own lines. tqdm draws the bar; a bar clears itself when its loop ends.
"""

import sys

import tqdm


def bar(total: int | None = None, desc: str | None = None, unit: str = "it", file=None,
        **kwargs) -> tqdm.tqdm:
  """A bar to advance by hand (`.update(n)`, then `.close()`; or use it as a context manager).

  Args:
    total: the count at completion (None: a count and a rate without an ETA).
    desc: what is counted, shown before the bar.
    unit: the name of one item ("batch", "record", "shard").
    file: the stream drawn on (default: `sys.stderr` at the time of the call); nothing is
      written unless it is a terminal (`isatty()`).
    **kwargs: passed to `tqdm.tqdm`.

  Returns:
    The tqdm bar (disabled off a terminal: then its calls do nothing).
  """
  kwargs.setdefault("leave", False)
  kwargs.setdefault("mininterval", 0.5)
  return tqdm.tqdm(total=total, desc=desc, unit=unit, file=sys.stderr if file is None else file,
                   disable=None, **kwargs)


def track(iterable, total: int | None = None, desc: str | None = None, unit: str = "it",
          file=None, **kwargs):
  """The items of `iterable`, counted by a bar as they are taken (see `bar`).

  >>> list(track(range(3), desc="quiet off a terminal"))
  [0, 1, 2]

  Args:
    iterable: the items.
    total: their number (default `len(iterable)` where it has one).
    desc: what is counted, shown before the bar.
    unit: the name of one item.
    file: the stream drawn on (default `sys.stderr`); quiet unless it is a terminal.
    **kwargs: passed to `tqdm.tqdm`.

  Returns:
    An iterable over the items of `iterable`; the bar closes when they run out.
  """
  kwargs.setdefault("leave", False)
  kwargs.setdefault("mininterval", 0.5)
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit,
                   file=sys.stderr if file is None else file, disable=None, **kwargs)
