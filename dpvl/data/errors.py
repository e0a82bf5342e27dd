"""The error a bad record raises: the loader skips the record and counts it by `reason`; and the
check that stops a run whose data has gone bad before it spends budget on nothing."""

import collections

from scipy import stats

# Reasons are short, stable names: they are keys of the `skipped` counts in metrics.jsonl.
CORRUPT_IMAGE = "corrupt_image"        # not a decodable JPEG/PNG/WebP, or cut short
MISSING_IMAGE = "missing_image"        # no image member for the key
MISSING_CAPTION = "missing_caption"    # no caption member for the key
EMPTY_CAPTION = "empty_caption"        # nothing left after cleaning
NON_UTF8_CAPTION = "non_utf8_caption"  # caption bytes are not UTF-8
TRUNCATED_TAR = "truncated_tar"        # a member cut off by the end of its tar file
MISSING_SHARD = "missing_shard"        # the file holding the record cannot be opened
UNREADABLE_RECORD = "unreadable_record"  # any other failure to read the record
BAD_RECORD = "bad_record"              # the objective could not prepare the record


class BadRecord(ValueError):
  """A record that cannot be used, and why (one of the reasons above)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason

  def __reduce__(self):  # picklable across worker processes
    return type(self), (self.reason, str(self).partition(": ")[2])


def check_index(index, size: int) -> int:
  """`index` as an int; IndexError unless 0 <= index < size (a caller's bug, not a bad record)."""
  index = int(index)
  if not 0 <= index < size:
    raise IndexError(f"index {index} out of range for {size} records.")
  return index


class TooManyBadRecords(RuntimeError):
  """The share of skipped records is far above `config.data.max_skip_fraction`."""


def too_many_skipped(skipped: int, drawn: int, max_fraction: float,
                     significance: float = 1e-6) -> bool:
  """Whether `skipped` of `drawn` records is significantly more than `max_fraction` of them:
  P(Binomial(drawn, max_fraction) >= skipped) < `significance`. With healthy data skipping at
  most that rate, a run is stopped by mistake with probability below `significance` per check;
  with data that yields nothing, a batch of 32 records is enough to stop it (at 5%).

  Args:
    skipped: records that could not be used.
    drawn: records drawn, skipped ones included.
    max_fraction: the skip rate healthy data stays below (`config.data.max_skip_fraction`).
    significance: the test's level: the chance per check of stopping a healthy run.

  Returns:
    True if the skips are too many to come from data skipping at most `max_fraction`.
  """
  if skipped == 0:
    return False
  return float(stats.binom.sf(skipped - 1, drawn, max_fraction)) < significance


class SkipMonitor:
  """Counts the records a run skips: in total, by reason, and over the last `window` steps, where
  `too_many` stops the run before its budget is spent on data that has gone bad."""

  def __init__(self, window: int, max_fraction: float):
    self.max_fraction = max_fraction
    self.totals = collections.Counter()  # reason -> records skipped since the run (re)started
    self._recent = collections.deque(maxlen=window)  # (drawn, Counter of skipped) per step

  def add(self, drawn: int, skipped: dict[str, int]) -> None:
    """One step's batch: `drawn` records selected, `skipped` of them unusable, by reason."""
    self.totals.update(skipped)
    self._recent.append((drawn, collections.Counter(skipped)))

  def too_many(self) -> str | None:
    """Why the recent steps skipped far more than `max_fraction` of their records, or None."""
    drawn = sum(d for d, _ in self._recent)
    reasons = sum((c for _, c in self._recent), collections.Counter())
    skipped = sum(reasons.values())
    if not too_many_skipped(skipped, drawn, self.max_fraction):
      return None
    return (f"{skipped} of the {drawn} records drawn in the last {len(self._recent)} steps "
            f"could not be used ({dict(reasons)}), far more than "
            f"config.data.max_skip_fraction={self.max_fraction} allows")
