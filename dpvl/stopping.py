"""Stop requests: SIGINT (Ctrl-C) and SIGTERM (a preempted VM, a scheduler's time limit) ask a
run to stop at the end of its current step, with a checkpoint; the same signal again aborts at
once (the handler that was there before takes over)."""

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
  """`with StopRequests(log) as stop:` ... `if stop.requested: ...` (handlers are installed
  only in the main thread, where Python delivers signals)."""

  def __init__(self, log=print):
    self._log = log
    self._previous = {}
    self.signal_name = None

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])  # a second one aborts at once
    self._log(f"{self.signal_name}: stopping at the end of this step with a checkpoint; send it "
              "again to abort at once.")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
