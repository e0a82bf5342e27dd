"""The ledger across resumes: segments from what ran, never from the config; written before each
release; a replay that is not bit for bit gets fresh noise and its abandoned steps are counted."""

import json
import os
import shutil

import pytest

from dpvl import train
from dpvl.privacy import accounting
from dpvl.privacy import ledger as ledger_lib
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import secrets as secrets_lib


class _Interrupt(Exception):
  pass


def _crash_after(step: int):
  """An `after_step` hook that kills the run once step `step`'s metrics are released."""
  def after_step(done):
    if done == step:
      raise _Interrupt()
  return after_step


def _quiet(*_):
  pass


def _files(root) -> dict:
  """{path: bytes} of every file under `root`."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _ledger(workdir):
  with open(os.path.join(workdir, "privacy.json")) as f:
    return json.load(f)


def test_plain_resume_after_a_forced_one_keeps_every_segment_and_the_budget(tmp_path, dpcap_config):
  workdir = str(tmp_path)
  first = dpcap_config(noise_multiplier=2.0)  # 6 steps
  train.run(first, workdir, log=_quiet)
  second = dpcap_config(noise_multiplier=0.8)
  second.steps = 12
  done = plan_lib.build_plan(first).segment(6)
  plan = plan_lib.build_plan(second)
  eps = lambda k: accounting.epsilon("pld", [done, plan.segment(k)], plan.delta)
  second.privacy.target_epsilon = budget = (eps(5) + eps(6)) / 2  # room for 5 of 6 new steps

  with pytest.raises(_Interrupt):  # released step 10; the last checkpoint is step 9
    train.run(second, workdir, force_resume=True, log=_quiet, after_step=_crash_after(10))
  entry = train.run(second, workdir, log=_quiet)  # the documented way to continue
  assert [(s["start"], s["steps"], s["noise_multiplier"]) for s in entry["segments"]] == [
      (0, 6, 2.0), (6, 5, 0.8)]
  assert entry["status"] == "budget_exhausted" and entry["steps_done"] == 11
  assert entry["epsilon_spent"] == pytest.approx(eps(5), rel=1e-6)
  assert entry["epsilon_spent"] <= budget < eps(6)

  # Re-running the command of the finished run: it says so and touches no file.
  before = _files(workdir)
  logs = []
  assert train.run(second, workdir, log=logs.append) == entry
  assert _files(workdir) == before
  assert any("is complete" in line for line in logs)


def test_resume_with_a_changed_learning_rate_replays_with_fresh_noise(tmp_path, monkeypatch,
                                                                       dpcap_config):
  keys = []
  noise_key = secrets_lib.RunSecrets.noise_key
  monkeypatch.setattr(secrets_lib.RunSecrets, "noise_key",
                      lambda self, segment, step: keys.append((segment, step))
                      or noise_key(self, segment, step))
  config = dpcap_config()  # 6 steps, checkpoints every 3, metrics every 2
  workdir = str(tmp_path)
  with pytest.raises(_Interrupt):
    train.run(config, workdir, log=_quiet, after_step=_crash_after(4))
  # The ledger was written before step 4's metrics were released; the checkpoint is at step 3.
  assert _ledger(workdir)["steps_done"] == 4 == _metrics(workdir)[-1]["step"]
  assert keys == [(0, step) for step in range(4)]

  keys.clear()
  os.remove(os.path.join(workdir, "privacy.json"))  # lost: the metrics still show step 4
  config.optimizer.learning_rate *= 2  # not in the privacy plan: no --force_resume needed
  logs = []
  entry = train.run(config, workdir, log=logs.append)
  # Steps 4-6 are recomputed from step 3's checkpoint with the keys of a new segment.
  assert keys == [(1, step) for step in range(3, 6)]
  assert [(s["start"], s["steps"]) for s in entry["segments"]] == [(0, 4), (3, 3)]
  assert entry["steps_done"] == 6 and entry["steps_accounted"] == 7
  plan = plan_lib.build_plan(config)
  assert entry["epsilon_spent"] == pytest.approx(
      accounting.epsilon("pld", [plan.segment(4), plan.segment(3)], plan.delta), rel=1e-6)
  assert entry["epsilon_spent"] > plan.epsilon(6)
  assert any("optimizer.learning_rate" in line and "steps 4..4" in line for line in logs)


def test_lost_checkpoints_never_make_the_ledger_forget(tmp_path, dpcap_config):
  workdir = str(tmp_path)
  config = dpcap_config()
  with pytest.raises(_Interrupt):  # released 4 steps; the last checkpoint is step 3
    train.run(config, workdir, log=_quiet, after_step=_crash_after(4))
  first = _ledger(workdir)
  shutil.rmtree(tmp_path / "checkpoints")
  before = _files(workdir)
  with pytest.raises(ledger_lib.ResumeError, match="accounts for 4 steps"):
    train.run(config, workdir, log=_quiet)
  assert _files(workdir) == before  # privacy.json is not reset

  entry = train.run(config, workdir, force_restart=True, log=_quiet)
  assert [(s["start"], s["steps"]) for s in entry["segments"]] == [(0, 4), (0, 6)]
  assert entry["steps_accounted"] == 10 and entry["earlier_runs"] == [first["run_id"]]
  plan = plan_lib.build_plan(config)
  assert entry["epsilon_spent"] == pytest.approx(
      accounting.epsilon("pld", [plan.segment(4), plan.segment(6)], plan.delta), rel=1e-6)
  with pytest.raises(ledger_lib.ResumeError, match="re-run without it"):
    train.run(config, workdir, force_restart=True, log=_quiet)

  # Without privacy.json either, the metrics still show that steps were trained.
  shutil.rmtree(tmp_path / "checkpoints")
  os.remove(tmp_path / "privacy.json")
  with pytest.raises(ledger_lib.ResumeError, match="metrics.jsonl shows 6 steps"):
    train.run(config, workdir, force_restart=True, log=_quiet)


# -- the resume decision ---------------------------------------------------------------------


def _record(start, steps, sigma=1.0, computation="c"):
  return ledger_lib.Record(start, accounting.Segment(1000, 0.01, sigma, steps, 64),
                           dict(noise_multiplier=sigma), computation)


def test_the_last_segment_goes_on_only_when_it_is_recomputed_bit_for_bit():
  records = [_record(0, 6, sigma=2.0), _record(6, 4)]
  same = ledger_lib.resume(records, 8, dict(noise_multiplier=1.0), "c")
  assert (same.closed, same.start, same.released, same.segment_index) == (
      (records[0],), 6, 4, 1)
  for checkpoint_step, computation in ((8, "other"), (5, "c")):  # changed, or before its start
    new = ledger_lib.resume(records, checkpoint_step, dict(noise_multiplier=1.0), computation)
    assert (new.closed, new.start, new.released, new.segment_index) == (
        tuple(records), checkpoint_step, 0, 2)
    assert new.abandoned() == 10 - checkpoint_step
  with pytest.raises(ledger_lib.ResumeError, match="noise_multiplier 1.0 -> 0.5"):
    ledger_lib.resume(records, 10, dict(noise_multiplier=0.5), "c")
  forced = ledger_lib.resume(records, 10, dict(noise_multiplier=0.5), "c", force=True)
  assert forced.start == 10 and forced.abandoned() == 0


def test_replayed_steps_are_not_counted_twice_within_a_segment(tmp_path, dpcap_config):
  plan = plan_lib.build_plan(dpcap_config())
  ledger = ledger_lib.Ledger(str(tmp_path / "privacy.json"), plan,
                             ledger_lib.Resume((), 0, 4), "c", {})
  ledger.advance(3)  # a replay from the checkpoint at step 2
  assert ledger.step == 4 and ledger.epsilon() == pytest.approx(plan.epsilon(4))
  ledger.advance(5)
  assert ledger.write("running")["steps_accounted"] == 5


def test_the_further_ledger_wins_and_another_runs_is_refused():
  a = dict(run_id="r1", segments=[_record(0, 3).to_json()])
  b = dict(run_id="r1", segments=[_record(0, 5).to_json()])
  assert ledger_lib.latest(a, b) is b and ledger_lib.latest(b, a) is b
  assert ledger_lib.latest(a, None) is a
  with pytest.raises(ledger_lib.ResumeError, match="another run"):
    ledger_lib.latest(a, dict(b, run_id="r2"))


def test_the_computation_fingerprint_sees_what_changes_a_step(dpcap_config):
  config = dpcap_config()
  base = ledger_lib.computation_fingerprint(config)
  for field, value in (("log_every", 7), ("checkpoint_every", 9), ("privacy.seed", 99)):
    changed = dpcap_config()
    changed.update_from_flattened_dict({field: value})
    assert ledger_lib.computation_fingerprint(changed) == base, field
  for field, value in (("optimizer.learning_rate", 1e-4), ("batch.microbatch_size", 8),
                       ("model.decoder.depth", 2), ("data.source", "procedural"),
                       ("objective", "vip_mae")):
    changed = dpcap_config()
    changed.update_from_flattened_dict({field: value})
    assert ledger_lib.computation_fingerprint(changed) != base, field


def test_turning_the_loss_estimate_on_at_a_resume_needs_force_and_composes(tmp_path,
                                                                           dpcap_config):
  # A ledger of 4 steps without the estimate, and a checkpoint at step 4 (no training needed).
  off_config = dpcap_config()
  off = plan_lib.build_plan(off_config)
  run_secrets = secrets_lib.RunSecrets.from_test_seed(1234)
  path = str(tmp_path / "privacy.json")
  entry = ledger_lib.Ledger(path, off, ledger_lib.Resume((), 0, 4), "c",
                            dict(run_id=run_secrets.run_id)).write("running")
  checkpoint = (4, dict(secrets=run_secrets.hex(), ledger=entry))

  on_config = dpcap_config(loss_estimate=dict(enabled=True, bound=10.0, noise_ratio=3.0))
  on = plan_lib.build_plan(on_config)
  assert on.loss_noise_multiplier == 3.0
  with pytest.raises(ledger_lib.ResumeError, match="loss_noise_multiplier None -> 3.0"):
    ledger_lib.open_run(on_config, str(tmp_path), on, checkpoint, log=_quiet)
  opening = ledger_lib.open_run(on_config, str(tmp_path), on, checkpoint, force_resume=True,
                                log=_quiet)
  ledger = ledger_lib.Ledger(path, opening.plan, opening.resumed, "c", opening.header)
  ledger.advance(6)
  entry = ledger.write("running")
  sigma_eff = accounting.combined_noise_multiplier(1.0, 3.0)
  assert [(s["start"], s["steps"], s["noise_multiplier"]) for s in entry["segments"]] == [
      (0, 4, 1.0), (4, 2, sigma_eff)]
  assert entry["epsilon_spent"] == pytest.approx(accounting.epsilon(
      "pld", [off.segment(4), off.segment(2).replace(noise_multiplier=sigma_eff)], off.delta))
  assert entry["epsilon_spent"] > off.epsilon(6)
  # Turning it off again is a plan change too.
  checkpoint = (6, dict(secrets=run_secrets.hex(), ledger=entry))
  with pytest.raises(ledger_lib.ResumeError, match="loss_noise_multiplier 3.0 -> None"):
    ledger_lib.open_run(off_config, str(tmp_path), off, checkpoint, log=_quiet)
