"""Ctrl-C and SIGTERM stop a run at the end of its step with a checkpoint; twice aborts."""

import os
import signal

import pytest

from dpvl import checkpoint as checkpoint_lib
from dpvl import train


def _signal_at(step: int, times: int = 1, signum=signal.SIGINT):
  """An `after_step` hook that sends `signum` to this process `times` times after `step`."""
  def after_step(done):
    if done == step:
      for _ in range(times):
        os.kill(os.getpid(), signum)
  return after_step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_after_its_step_with_a_checkpoint(tmp_path, signum, dpcap_config):
  config = dpcap_config()  # 6 steps, checkpoints every 3
  entry = train.run(config, str(tmp_path), log=lambda *_: None,
                    after_step=_signal_at(4, signum=signum))
  assert entry["status"] == "interrupted" and entry["steps_done"] == 4
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == 4
  ckpt.close()
  assert not os.path.exists(tmp_path / "lock")
  assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)
  logs = []
  entry = train.run(config, str(tmp_path), log=logs.append)
  assert "resumed from step 4 in " + str(tmp_path) in logs
  assert entry["status"] == "completed" and entry["steps_done"] == 6


def test_a_second_ctrl_c_aborts_at_once(tmp_path, dpcap_config):
  with pytest.raises(KeyboardInterrupt):
    train.run(dpcap_config(), str(tmp_path), log=lambda *_: None,
              after_step=_signal_at(2, times=2))
  assert not os.path.exists(tmp_path / "lock")
