"""End to end: the demo objective trained with DP-SGD; ledger, metrics, resume, budget, warm
start."""

import json
import os

import jax
import numpy as np
import pytest

from dpvl import checkpoint as checkpoint_lib
from dpvl import config as config_lib
from dpvl import train
from dpvl.evaluate import checkpoint as eval_checkpoint
from dpvl.privacy import accounting
from dpvl.privacy import ledger as ledger_lib
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import secrets as secrets_lib


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir):
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  meta = ckpt.restore_meta()
  state = ckpt.restore_state_arrays()
  ckpt.close()
  return state["params"], meta


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, dpcap_config):
  """(workdir, final ledger entry) of the small DP-Cap config's run, shared by the tests that
  only read it."""
  workdir = tmp_path_factory.mktemp("default_run")
  return workdir, train.run(dpcap_config(), str(workdir), log=lambda *_: None)


def test_run_writes_ledger_metrics_config_and_checkpoint(default_run, dpcap_config):
  tmp_path, entry = default_run
  config = dpcap_config()
  ledger = json.load(open(tmp_path / "privacy.json"))
  assert ledger["steps_done"] == 6 and ledger["status"] == "completed"
  plan = plan_lib.build_plan(config)
  assert ledger["epsilon_spent"] == pytest.approx(plan.epsilon(6))
  assert entry["epsilon_spent"] == ledger["epsilon_spent"]
  for key in ("dataset_size", "expected_batch_size", "sampling_rate", "steps",
              "noise_multiplier", "clip_norm", "delta", "epsilon_planned", "epsilon_rdp",
              "epsilon_pld",
              "accountant", "sampling"):
    assert key in ledger
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [2, 4, 6]
  for r in rows:
    assert list(r) == ["step", "epsilon", "seconds", "data_wait_seconds",
                       "private_data_diagnostics"]  # no dp_loss: the estimate is off
    diagnostics = r["private_data_diagnostics"]
    assert set(diagnostics) == {"loss", "examples", "nonfinite", "clipped_fraction",
                                "grad_norm_mean", "truncated", "skipped"}
    assert np.isfinite(diagnostics["loss"]) and diagnostics["examples"] > 0
  assert all(a["epsilon"] < b["epsilon"] for a, b in zip(rows, rows[1:]))
  assert json.load(open(tmp_path / "config.json"))["objective"] == "dpcap"
  _, meta = _final_params(str(tmp_path))
  assert meta["ledger"]["steps_done"] == 6
  assert meta["secrets"] == secrets_lib.RunSecrets.from_test_seed(1234).hex()
  # The test seed is a secret: config.json and privacy.json do not hold it.
  assert json.load(open(tmp_path / "config.json"))["privacy"]["seed"] is None
  assert ledger["secrets"] == "config.privacy.seed"


def test_without_private_diagnostics_only_dp_outputs_are_logged(tmp_path, default_run,
                                                                  dpcap_config):
  estimate = dict(enabled=True, bound=10.0, noise_ratio=3.0)
  config = dpcap_config(loss_estimate=estimate)
  config.log_private_diagnostics = False
  logs = []
  entry = train.run(config, str(tmp_path / "dp"), log=logs.append)
  rows = _read_jsonl(tmp_path / "dp" / "metrics.jsonl")
  assert [list(r) for r in rows] == 3 * [["step", "epsilon", "seconds", "data_wait_seconds",
                                          "dp_loss"]]
  assert all(np.isfinite(r["dp_loss"]) for r in rows)
  steps = [line for line in logs if line.startswith("step")]
  assert len(steps) == 3
  for line, row in zip(steps, rows):  # only public and DP numbers: step, dp_loss, epsilon, time
    words = line.split()
    assert words[:2] == ["step", f"{row['step']}/6"] and words[2:4] == ["dp_loss", words[3]]
    assert words[4] == "epsilon" and words[6].endswith("s") and "examples" not in words
  start = next(line for line in logs if line.startswith("private run"))
  sigma_eff = accounting.combined_noise_multiplier(1.0, 3.0)
  assert f"sigma=1 sigma_loss=3 loss_sensitivity=10 sigma_eff={sigma_eff:.4g}" in start
  # The ledger accounts both releases at sigma_eff.
  assert [s["noise_multiplier"] for s in entry["segments"]] == [sigma_eff]
  plan = plan_lib.build_plan(dpcap_config())
  assert entry["epsilon_spent"] == pytest.approx(accounting.epsilon(
      "pld", [plan.segment(6).replace(noise_multiplier=sigma_eff)], plan.delta))

  # The gradient's noise is that of the run without the estimate: the same parameters.
  jax.tree.map(np.testing.assert_array_equal, _final_params(str(tmp_path / "dp"))[0],
               _final_params(str(default_run[0]))[0])


class _Interrupt(Exception):
  pass


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, dpcap_config):
  config = dpcap_config()
  train.run(config, str(tmp_path / "straight"), log=lambda *_: None)

  def crash_at_step_4(step):
    if step == 4:
      raise _Interrupt()

  with pytest.raises(_Interrupt):  # dies after step 4, last checkpoint at step 3
    train.run(config, str(tmp_path / "resumed"), log=lambda *_: None,
              after_step=crash_at_step_4)
  logs = []
  train.run(config, str(tmp_path / "resumed"), log=logs.append)
  assert any("resumed from step 3" in line for line in logs)
  # Step 4's row is written again, marked as a replay; `seconds` goes on from before the crash.
  rows = _read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
  assert [(r["step"], r.get("replayed", False)) for r in rows] == [
      (2, False), (4, False), (4, True), (6, False)]
  assert rows[2]["seconds"] >= rows[1]["seconds"]
  a, meta_a = _final_params(str(tmp_path / "straight"))
  b, meta_b = _final_params(str(tmp_path / "resumed"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert meta_a["ledger"]["epsilon_spent"] == meta_b["ledger"]["epsilon_spent"]
  assert meta_b["ledger"]["steps_done"] == 6


def test_resume_with_changed_privacy_plan_is_refused_unless_forced(tmp_path, dpcap_config):
  train.run(dpcap_config(), str(tmp_path), log=lambda *_: None)
  changed = dpcap_config(noise_multiplier=0.5)
  changed.steps = 8
  with pytest.raises(ledger_lib.ResumeError, match="noise_multiplier 1.0 -> 0.5"):
    train.run(changed, str(tmp_path), log=lambda *_: None)
  entry = train.run(changed, str(tmp_path), force_resume=True, log=lambda *_: None)
  # The ledger composes 6 steps at sigma 1.0 with 2 at sigma 0.5.
  assert [s["noise_multiplier"] for s in entry["segments"]] == [1.0, 0.5]
  assert [s["steps"] for s in entry["segments"]] == [6, 2]
  old = plan_lib.build_plan(dpcap_config())
  assert entry["epsilon_spent"] > old.epsilon(6)


def test_training_stops_at_the_privacy_budget(tmp_path, dpcap_config):
  config = dpcap_config(noise_multiplier=1.0, target_epsilon=None)
  plan = plan_lib.build_plan(config)
  budget = (plan.epsilon(3) + plan.epsilon(4)) / 2  # room for 3 steps, not 4
  config.privacy.target_epsilon = budget
  logs = []
  entry = train.run(config, str(tmp_path), log=logs.append)
  assert entry["steps_done"] == 3 and entry["status"] == "budget_exhausted"
  assert entry["epsilon_spent"] <= budget
  assert any("privacy budget reached" in line for line in logs)
  _, meta = _final_params(str(tmp_path))
  assert meta["ledger"]["steps_done"] == 3


def test_non_private_baseline_runs_through_the_same_step(tmp_path, dpcap_config):
  entry = train.run(dpcap_config(enabled=False), str(tmp_path), log=lambda *_: None)
  assert entry["private"] is False and entry["epsilon_spent"] is None
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  assert all(np.isfinite(r["private_data_diagnostics"]["loss"]) for r in rows)


def test_a_tan_simulation_trains_and_says_it_claims_nothing(tmp_path, dpcap_config):
  config = dpcap_config()
  config.steps = 3
  config.tan = dict(batch_size=8)  # the reference run's batch is 32
  logs = []
  entry = train.run(config, str(tmp_path), log=logs.append)
  assert entry["expected_batch_size"] == 8 and entry["noise_multiplier"] == 0.25
  assert entry["epsilon_spent"] is None and entry["epsilon_planned"] is None
  assert entry["simulation"]["reference_batch_size"] == 32
  assert entry["simulation"]["reference_epsilon"] > 0
  assert any("NO PRIVACY GUARANTEE" in line for line in logs)
  on_disk = json.loads((tmp_path / "privacy.json").read_text())
  assert "NO PRIVACY GUARANTEE" in on_disk["simulation"]["warning"]
  assert all(r["epsilon"] is None for r in _read_jsonl(tmp_path / "metrics.jsonl"))
  # Continued as a real run (a forced plan change), the simulation's steps stay accounted, at
  # their own tiny sigma: the budget they spent is never forgotten.
  config.tan = dict(batch_size=0)
  config.steps = 5
  with pytest.raises(ledger_lib.ResumeError):
    train.run(config, str(tmp_path), log=lambda *_: None)
  entry = train.run(config, str(tmp_path), force_resume=True, log=lambda *_: None)
  simulated, real = ledger_lib.records_of(entry)
  assert (simulated.segment.steps, simulated.segment.noise_multiplier) == (3, 0.25)
  assert (real.segment.steps, real.segment.noise_multiplier) == (2, 1.0)
  assert "simulation" in simulated.plan and "simulation" not in entry
  assert entry["epsilon_spent"] == pytest.approx(accounting.epsilon(
      "pld", [simulated.segment, real.segment], entry["delta"]))
  assert entry["epsilon_spent"] > 10 * accounting.epsilon("pld", [real.segment], entry["delta"])


def test_demo_loss_falls(tmp_path, dpcap_config):
  config = dpcap_config()
  config.steps = 40
  config.log_every = 5
  config.checkpoint_every = 100
  config.batch.expected_size = 64
  config.optimizer.learning_rate = 3e-3
  train.run(config, str(tmp_path), log=lambda *_: None)
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  first, last = (r["private_data_diagnostics"]["loss"] for r in (rows[0], rows[-1]))
  assert last < 0.7 * first, (first, last)


def test_bad_workdir_and_data_path_fail_before_any_slow_step(tmp_path, monkeypatch, dpcap_config):
  def no_calibration(*_, **__):
    raise AssertionError("the privacy plan was built before the cheap checks")
  monkeypatch.setattr(plan_lib, "build_plan", no_calibration)
  (tmp_path / "a_file").write_text("")
  with pytest.raises(config_lib.ConfigError, match="is a file, not a directory"):
    train.run(dpcap_config(), str(tmp_path / "a_file"), log=lambda *_: None)
  config = dpcap_config()
  config.data.source = "array_record"
  config.data.path = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match="missing"):
    train.run(config, str(tmp_path / "run"), log=lambda *_: None)
  with pytest.raises(config_lib.ConfigError, match="holds no checkpoint"):
    eval_checkpoint.evaluate_checkpoint(dpcap_config(), str(tmp_path / "nowhere"))
  assert not os.path.exists(tmp_path / "nowhere")


def test_stage2_starts_from_stage1_weights_with_a_fresh_ledger(tmp_path, dpcap_config):
  stage1 = dpcap_config(enabled=False)
  stage1.steps = 3
  train.run(stage1, str(tmp_path / "stage1"), log=lambda *_: None)
  stage1_params, _ = _final_params(str(tmp_path / "stage1"))

  stage2 = dpcap_config()
  stage2.init_from = str(tmp_path / "stage1")
  stage2.steps = 2
  stage2.checkpoint_every = 1
  entry = train.run(stage2, str(tmp_path / "stage2"), log=lambda *_: None)
  assert entry["steps_done"] == 2
  assert entry["epsilon_spent"] == pytest.approx(plan_lib.build_plan(stage2).epsilon(2))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "stage2" / "checkpoints"))
  first = ckpt.restore_state_arrays(step=1)
  meta = ckpt.restore_meta(step=1)
  ckpt.close()
  warm = meta["ledger"]["init_from"]
  assert warm["data"] == dict(source="shape_scenes", size=2_000, seed=0,
                              public="by_construction")
  assert warm["steps"] == 3 and warm["private"] is False
  assert json.load(open(tmp_path / "stage2" / "privacy.json"))["init_from"] == warm
  # Step 1 of stage 2 has learning rate 0 (warm-up starts at 0): parameters are stage 1's, and
  # the optimizer state is fresh (count 1).
  jax.tree.map(np.testing.assert_array_equal, first["params"], stage1_params)
  assert int(jax.tree.leaves(first["opt_state"])[0]) == 1

  # A private run cannot serve as a warm start (its budget would be forgotten).
  stage3 = dpcap_config()
  stage3.init_from = str(tmp_path / "stage2")
  with pytest.raises(config_lib.ConfigError, match="trained with DP"):
    train.run(stage3, str(tmp_path / "stage3"), log=lambda *_: None)
