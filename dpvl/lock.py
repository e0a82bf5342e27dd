"""One run per workdir: a lock file taken atomically, holding the holder's host and pid.

Two processes training in one workdir overwrite each other's checkpoints and ledger, so that
privacy.json claims one run where two spent budget. `WorkdirLock` creates `WORKDIR/lock` with
O_CREAT | O_EXCL (atomic on local and NFS v3+ filesystems): the second process is refused at
once with one sentence naming the holder. The lock is released when the run ends, however it
ends short of the process being killed; a lock left by a killed process on this host is stale
(its pid no longer runs) and is taken over with a line saying so. A lock held from another host
cannot be checked from here: it is reported, and removed by hand once that run is known to be
gone.
"""

import json
import os
import socket
import time


class LockedError(RuntimeError):
  """The workdir is held by another run."""


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, under another user
    return True
  return True


def _describe(holder: dict) -> str:
  if "pid" not in holder:
    return "another run (its lock file is being written or unreadable)"
  since = holder.get("since")
  when = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
          if isinstance(since, (int, float)) else "")
  return f"pid {holder['pid']} on {holder.get('host')}{when}"


class WorkdirLock:
  """`with WorkdirLock(workdir, log):` holds `workdir/lock` for the duration of the block."""

  def __init__(self, workdir: str, log=print):
    self.path = os.path.join(workdir, "lock")
    self._log = log
    self._held = False

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}  # being written, or unreadable: treat as held by an unknown process

  def acquire(self) -> None:
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.time())
    for _ in range(2):  # a second try after removing a stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        host, pid = holder.get("host"), holder.get("pid")
        if host == me["host"] and isinstance(pid, int) and not _running(pid):
          self._log(f"removing a stale lock of {self.path} (pid {pid} on {host} no longer "
                    "runs).")
          os.remove(self.path)
          continue
        raise LockedError(
            f"{os.path.dirname(self.path)} is in use by {_describe(holder)} (lock file "
            f"{self.path}); wait for that run to end, or remove the lock file if it is gone."
        ) from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self._held = True
      return
    raise LockedError(f"could not take {self.path}.")

  def release(self) -> None:
    if self._held:
      self._held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
