"""`python -m dpvl.report`: plots and summary.md of real short runs, a sweep of two epsilons,
workdirs that are not runs beside good ones, a run in progress, and both row layouts."""

import json
import math
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import evals as eval_configs
from dpvl import report
from dpvl import train
from tests import configs_for_tests

ROOT = os.path.join(os.path.dirname(__file__), "..")
PER_RUN_PLOTS = ("loss_vs_step.png", "epsilon_vs_step.png", "eval_probe_vs_step.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two real runs of the small DP-Cap config, 4 steps, a small linear probe and two sample
  captions at steps 0, 2 and 4: {name: workdir}. Their epsilons differ by delta (1/N and
  1e-7), not sigma: the step's noise std is compiled in, so one sigma compiles it once."""
  root = tmp_path_factory.mktemp("runs")
  workdirs = {}
  for name, delta, seed in (("run_a", None, 1), ("run_b", 1e-7, 2)):
    config = configs_for_tests.small_dpcap_config(delta=delta, seed=seed)
    config.steps = 4
    config.checkpoint_every = 100  # saves at steps 0 and 4 only
    probe = eval_configs.scene_probe("label", blocks=1, every=2, train_size=64, test_size=32,
                                     image_size=16)
    probe.update(dict(steps=20, batch_size=32))
    samples = eval_configs.scene_caption_samples(count=2, every=2, image_size=16)
    config.evals = ml_collections.ConfigDict(dict(probe=probe, samples=samples))
    workdirs[name] = str(root / name)
    train.run(config, workdirs[name], log=lambda *_: None)
  return workdirs


def _ledger(workdir):
  with open(os.path.join(workdir, "privacy.json")) as f:
    return json.load(f)


def _copy(workdir, to):
  """A copy of a run's workdir files (no checkpoints) at `to`."""
  os.makedirs(to)
  for name in ("config.json", "privacy.json", "metrics.jsonl"):
    shutil.copy(os.path.join(workdir, name), to)
  return str(to)


def _assert_real_png(path):
  assert os.path.getsize(path) > 0, path
  with Image.open(path) as image:
    assert image.format == "PNG" and image.width > 100 and image.height > 100
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
  assert colours is None or len(colours) > 1, f"{path} is blank"


def _report(*args):
  lines, warnings = [], []
  rc = report.report(list(args[:-1]), args[-1], log=lines.append, warn=warnings.append)
  return rc, lines, warnings


def test_sweep_of_two_runs_plots_and_summarises(runs, tmp_path):
  out = str(tmp_path / "report")
  rc, lines, warnings = _report(runs["run_a"], runs["run_b"], out)
  assert rc == 0 and not warnings
  for name in runs:
    for plot in PER_RUN_PLOTS:
      _assert_real_png(os.path.join(out, name, plot))
      assert f"{name}: {os.path.join(out, name, plot)}" in lines
  for metric in ("probe_top1", "probe_train_top1"):
    _assert_real_png(os.path.join(out, f"sweep_{metric}_vs_epsilon.png"))
  assert not os.path.exists(os.path.join(out, "sweep_probe_skipped_vs_epsilon.png"))
  assert lines[-1] == f"summary of 2 runs: {os.path.join(out, 'summary.md')}"

  summary = open(os.path.join(out, "summary.md")).read()
  rows = {line.split(" | ")[0][2:]: line for line in summary.splitlines()
          if line.startswith("| run_")}
  assert set(rows) == {"run_a", "run_b"}
  epsilons = {}
  for name, row in rows.items():
    ledger = _ledger(runs[name])
    epsilons[name] = ledger["epsilon_spent"]
    cells = row.strip("| ").split(" | ")
    assert cells[2] == f"{ledger['epsilon_spent']:.4g} (pld)"
    assert cells[4] == f"{ledger['delta']:.3g}" and cells[5] == "1"
    assert cells[6] == "4/4" and cells[7] == "completed"
    final_top1 = [json.loads(l) for l in open(os.path.join(runs[name], "metrics.jsonl"))][-1]
    assert cells[8] == f"{final_top1['probe/top1']:.4g}"
  assert epsilons["run_b"] > epsilons["run_a"] > 0  # a smaller delta, a larger epsilon
  assert "final probe/top1" in summary and "final probe/skipped" not in summary
  assert "## Not reported" not in summary


def test_one_workdir_reports_into_its_report_folder(runs, tmp_path):
  workdir = _copy(runs["run_a"], tmp_path / "run")
  result = subprocess.run([sys.executable, "-m", "dpvl.report", workdir], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  for plot in PER_RUN_PLOTS:
    _assert_real_png(os.path.join(workdir, "report", plot))
  assert os.path.join(workdir, "report", "summary.md") in result.stdout
  assert not any(name.startswith("sweep") for name in os.listdir(os.path.join(workdir, "report")))
  several = subprocess.run([sys.executable, "-m", "dpvl.report", workdir, workdir], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
  assert several.returncode == 2 and "--out is needed" in several.stderr


def test_paths_that_are_not_runs_are_named_beside_the_good_ones(runs, tmp_path):
  garbage = _copy(runs["run_a"], tmp_path / "garbage_metrics")
  with open(os.path.join(garbage, "metrics.jsonl"), "w") as f:
    f.write("not json at all\n{\"step\": 2, \"loss\": 1.0}\n")
  no_ledger = _copy(runs["run_b"], tmp_path / "no_ledger")
  os.remove(os.path.join(no_ledger, "privacy.json"))
  other = tmp_path / "photos"
  other.mkdir()
  (other / "cat.jpg").write_bytes(b"\xff\xd8 not a run")
  missing = str(tmp_path / "missing")
  out = str(tmp_path / "report")

  rc, _, warnings = _report(runs["run_a"], garbage, no_ledger, str(other), missing, out)
  assert rc == 0
  assert warnings == [
      f"{garbage}: not reported: metrics.jsonl line 1 is not JSON: 'not json at all'",
      f"{no_ledger}: not reported: no privacy.json",
      f"{other}: not reported: not a dpvl run: no config.json, privacy.json or metrics.jsonl",
      f"{missing}: not reported: no such directory"]
  summary = open(os.path.join(out, "summary.md")).read()
  assert "| run_a |" in summary
  not_reported = summary.split("## Not reported")[1]
  for path in (garbage, no_ledger, str(other), missing):
    assert f"`{path}`" in not_reported
  _assert_real_png(os.path.join(out, "run_a", "loss_vs_step.png"))

  out_bad = str(tmp_path / "report_bad")
  rc, lines, warnings = _report(garbage, str(other), out_bad)
  assert rc == 2 and not lines and warnings[-1] == "error: no dpvl run to report."
  assert not os.path.exists(out_bad)


def test_run_in_progress_reports(runs, tmp_path):
  workdir = _copy(runs["run_b"], tmp_path / "in_progress")
  metrics = os.path.join(workdir, "metrics.jsonl")
  text = open(metrics).read()
  training = [l for l in text.splitlines(keepends=True) if '"epsilon"' in l]
  cut = text.index(training[-1]) + len(training[-1]) // 2
  with open(metrics, "w") as f:
    f.write(text[:cut])  # the step-4 row half-written: no step-4 eval row either
  ledger = dict(_ledger(workdir), status="running")
  with open(os.path.join(workdir, "privacy.json"), "w") as f:
    json.dump(ledger, f)

  run = report.load_run(workdir)
  assert [r["step"] for r in run.training] == [2]
  assert sorted(run.evals) == [0, 2]
  out = str(tmp_path / "report")
  rc, _, warnings = _report(workdir, out)
  assert rc == 0 and not warnings
  for plot in PER_RUN_PLOTS:
    _assert_real_png(os.path.join(out, plot))
  summary = open(os.path.join(out, "summary.md")).read()
  assert "| running |" in summary
  assert "(step 2)" in summary  # the last probe is older than the ledger's step
  assert "last line of metrics.jsonl is incomplete" in summary

  os.remove(metrics)  # a run that has logged nothing yet: its ledger alone
  rc, _, warnings = _report(workdir, str(tmp_path / "report_early"))
  assert rc == 0 and not warnings
  summary = open(tmp_path / "report_early" / "summary.md").read()
  assert "| running |" in summary and "no metrics.jsonl yet" in summary


def _hand_written_run(path, rows):
  """A workdir with a ledger, a config and the given metrics rows."""
  os.makedirs(path)
  ledger = dict(private=True, status="completed", steps_done=4, steps=4, configured_steps=4,
                epsilon_spent=2.5, delta=1e-5, noise_multiplier=1.5, accountant="pld",
                target_epsilon=3.0, mechanism="per_example", dataset_size=1000,
                expected_batch_size=32)
  with open(os.path.join(path, "privacy.json"), "w") as f:
    json.dump(ledger, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(objective="dpcap", data=dict(source="shape_scenes", size=1000)), f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_both_row_layouts_replays_and_an_audit(tmp_path):
  flat = [dict(step=2, loss=3.0, epsilon=1.0, examples=30, seconds=1.0),
          dict(step=4, loss=2.5, epsilon=2.5, examples=31, seconds=2.0)]
  nested = [
      dict(step=0, eval_seconds=0.5, **{"probe/top1": 0.3, "probe/skipped": 2}),
      dict(step=2, epsilon=1.0, seconds=1.0,
           private_data_diagnostics=dict(loss=3.0, examples=30, clipped_fraction=1.0)),
      dict(step=4, epsilon=2.5, seconds=2.0,
           private_data_diagnostics=dict(loss=9.0, examples=31)),
      # resumed from step 2: step 4 again, replayed; its last row is the one shown
      dict(step=4, epsilon=2.5, seconds=3.0, replayed=True,
           private_data_diagnostics=dict(loss=2.5, examples=31)),
      dict(step=4, eval_seconds=0.5, **{"probe/top1": 0.4, "probe/skipped": 2}),
      dict(step=4, audit=dict(claimed_epsilon=2.5, empirical_epsilon_lower_bound=0.61,
                              canaries=1000, confidence=0.95, canary_kind="gradient"))]
  with_dp_loss = [dict(r, dp_loss=r["private_data_diagnostics"]["loss"] + 0.1)
                  if "private_data_diagnostics" in r else r for r in nested]

  runs = {name: report.load_run(_hand_written_run(tmp_path / name, rows))
          for name, rows in (("flat", flat), ("nested", nested), ("dp_loss", with_dp_loss))}
  assert report.loss_series(runs["flat"].training) == (
      report.PRIVATE_LOSS_LABEL, [2, 4], [3.0, 2.5])
  assert report.loss_series(runs["nested"].training) == (
      report.PRIVATE_LOSS_LABEL, [2, 4], [3.0, 2.5])
  label, steps, values = report.loss_series(runs["dp_loss"].training)
  assert label == report.DP_LOSS_LABEL and steps == [2, 4]
  np.testing.assert_allclose(values, [3.1, 2.6])
  assert runs["nested"].final_evals() == {"probe/top1": (4, 0.4)}
  assert runs["nested"].audit["empirical_epsilon_lower_bound"] == 0.61

  out = str(tmp_path / "report")
  rc, _, warnings = _report(*(str(tmp_path / name) for name in runs), out)
  assert rc == 0 and not warnings
  for name in ("nested", "dp_loss"):
    for plot in PER_RUN_PLOTS:
      _assert_real_png(os.path.join(out, name, plot))
  summary = open(os.path.join(out, "summary.md")).read()
  assert "| 0.61 (claimed 2.5; 1000 gradient canaries; confidence 0.95) |" in summary
  assert "probe/skipped: 2 evaluation records could not be read" in summary
  assert "| flat | dpcap, per_example, shape_scenes N=1000, B=32 | 2.5 (pld) | 3 | 1e-05 | 1.5 |" \
      in summary


def test_a_tan_simulation_claims_nothing_and_sits_at_its_reference_epsilon(tmp_path):
  rows = [dict(step=4, epsilon=None, seconds=1.0, private_data_diagnostics=dict(loss=2.0)),
          dict(step=4, eval_seconds=0.5, **{"probe/top1": 0.5})]
  real = _hand_written_run(tmp_path / "real", [dict(r, epsilon=2.5) if "seconds" in r else r
                                                 for r in rows])
  simulated = _hand_written_run(tmp_path / "tan", rows)
  ledger = json.loads(open(os.path.join(simulated, "privacy.json")).read())
  ledger.update(epsilon_spent=None, simulation=dict(reference_batch_size=4096,
                                                    reference_epsilon=8.0))
  with open(os.path.join(simulated, "privacy.json"), "w") as f:
    json.dump(ledger, f)
  run = report.load_run(simulated)
  assert run.epsilon == math.inf and run.sweep_epsilon == 8.0
  out = str(tmp_path / "report")
  rc, _, warnings = _report(real, simulated, out)
  assert rc == 0 and not warnings
  summary = open(os.path.join(out, "summary.md")).read()
  assert "| none: TAN simulation of a run at epsilon 8 (B=4096) |" in summary
  _assert_real_png(os.path.join(out, "sweep_probe_top1_vs_epsilon.png"))


def test_sample_captions_go_to_the_evals_folder_not_the_metrics(runs):
  for step in (0, 2, 4):
    with open(os.path.join(runs["run_a"], "evals", f"step_{step}.json")) as f:
      samples = json.load(f)
    (captions,) = [v for k, v in samples.items() if k.startswith("samples/")]
    assert len(captions) == 2
  with open(os.path.join(runs["run_a"], "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all(not k.startswith("samples/") or isinstance(v, (int, float))
             for row in rows for k, v in row.items())
