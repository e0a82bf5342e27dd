"""One run per workdir: the lock file refuses a second process at once and names the holder."""

import json
import os
import socket
import subprocess
import sys

import pytest

from dpvl import lock as lock_lib
from dpvl import train


def _hold(workdir, pid):
  with open(os.path.join(workdir, "lock"), "w") as f:
    json.dump(dict(host=socket.gethostname(), pid=pid, since=0), f)


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
  with lock_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(lock_lib.LockedError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert not os.path.exists(tmp_path / "lock")
  with lock_lib.WorkdirLock(str(tmp_path)):
    assert json.load(open(tmp_path / "lock"))["pid"] == os.getpid()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  _hold(str(tmp_path), gone.pid)
  logs = []
  with lock_lib.WorkdirLock(str(tmp_path), log=logs.append):
    assert json.load(open(tmp_path / "lock"))["pid"] == os.getpid()
  assert any("stale lock" in line and str(gone.pid) in line for line in logs)


def test_a_run_is_refused_at_once_while_another_process_holds_the_workdir(tmp_path, dpcap_config):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    _hold(str(tmp_path), holder.pid)
    with pytest.raises(lock_lib.LockedError, match=f"in use by pid {holder.pid}"):
      train.run(dpcap_config(), str(tmp_path), log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["lock"]  # nothing else was touched
  finally:
    holder.kill()
