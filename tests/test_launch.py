"""launch/: the sweep's grid, names, skips and failures; the TPU pod and SLURM dry runs."""

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "launch", "sweep.py")
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
CONFIG = "configs/dpcap_tiny.py"

_spec = importlib.util.spec_from_file_location("launch_sweep", SWEEP)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _write_ledger(workdir, status, epsilon=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "privacy.json"), "w") as f:
    json.dump(dict(status=status, epsilon_spent=epsilon), f)


# The grid and its names (pure functions).


def test_parse_sweep_splits_the_field_and_its_values():
  assert sweep.parse_sweep("privacy.target_epsilon=1, 2,4") == (
      "privacy.target_epsilon", ["1", "2", "4"])
  assert sweep.parse_sweep("data.path=a=b") == ("data.path", ["a=b"])


@pytest.mark.parametrize("spec, message", [
    ("privacy.target_epsilon", "expected FIELD=VALUE,VALUE"),
    ("privacy.target_epsilon=", "the value list is empty"),
    ("privacy.target_epsilon=1,,2", "a value is empty"),
    ("=1,2", "is not a dotted config field name"),
    ("privacy..x=1", "is not a dotted config field name"),
    ("optimizer.learning_rate=1e-3,0.001", "1e-3 and 0.001 are the same value"),
])
def test_parse_sweep_refuses_bad_specs(spec, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.parse_sweep(spec)


def test_value_names_normalise_numbers():
  assert [sweep.value_name(v) for v in ["1", "08", "1e-3", "2.50", "1.0", "nan", "adamw"]] == [
      "1", "8", "0.001", "2.5", "1.0", "nan", "adamw"]


def test_the_grid_is_the_product_in_the_order_given():
  runs = sweep.expand([("privacy.target_epsilon", ["1", "2"]),
                       ("optimizer.learning_rate", ["1e-3", "2e-3"])])
  assert [name for name, _ in runs] == [
      "target_epsilon=1,learning_rate=0.001", "target_epsilon=1,learning_rate=0.002",
      "target_epsilon=2,learning_rate=0.001", "target_epsilon=2,learning_rate=0.002"]
  assert runs[1][1] == {"privacy.target_epsilon": "1", "optimizer.learning_rate": "2e-3"}


def test_fields_sharing_a_leaf_are_named_in_full():
  runs = sweep.expand([("model.encoder.width", ["32"]), ("model.decoder.width", ["64"]),
                       ("steps", ["6"])])
  assert [name for name, _ in runs] == ["model.encoder.width=32,model.decoder.width=64,steps=6"]


def test_unsafe_values_get_safe_unique_names():
  runs = sweep.expand([("init_from", ["/a/b", "_a_b", "a b", "x" * 200])])
  names = [name for name, _ in runs]
  assert len(set(names)) == 4
  assert names[1] == "init_from=_a_b"  # safe as it is
  assert names[0].startswith("init_from=_a_b-") and names[2].startswith("init_from=a_b-")
  for name in names:
    assert "/" not in name and " " not in name and len(name) < 100


def test_a_field_swept_twice_is_refused():
  with pytest.raises(sweep.SweepError, match="given twice"):
    sweep.expand([("steps", ["1"]), ("steps", ["2"])])


def test_commands_pass_the_values_as_given():
  assert sweep.command("py", CONFIG, "r/steps=6", {"steps": "6"}, ["--mode=account"]) == [
      "py", "-m", "dpvl.main", f"--config={CONFIG}", "--workdir=r/steps=6", "--config.steps=6",
      "--mode=account"]


# The sweep's command line.


def _sweep_main(argv, capsys, run=None):
  status = sweep.main(argv, run=run or (lambda cmd: pytest.fail(f"ran {cmd}")))
  out, err = capsys.readouterr()
  return status, out, err


def test_dry_run_prints_each_command_and_imports_no_jax(tmp_path):
  # The script is run through runpy so that the child can report what it imported.
  wrapper = ("import runpy, sys\n"
             "sys.argv = sys.argv[1:]\n"
             "try:\n"
             "  runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "finally:\n"
             "  print('jax imported' if 'jax' in sys.modules else 'no jax', file=sys.stderr)\n")
  root = str(tmp_path / "sweep")
  result = subprocess.run(
      [sys.executable, "-c", wrapper, SWEEP, f"--config={CONFIG}",
       "--sweep=privacy.target_epsilon=1,8", "--sweep=optimizer.learning_rate=1e-3",
       f"--workdir_root={root}", "--dry-run", "--", "--config.steps=6", "--config.log_every=a b"],
      cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  python = "python" if shutil.which("python") == sys.executable else sys.executable
  assert result.stdout.splitlines() == [
      f"{python} -m dpvl.main --config={CONFIG} --workdir={root}/target_epsilon={eps},"
      f"learning_rate=0.001 --config.privacy.target_epsilon={eps} "
      "--config.optimizer.learning_rate=1e-3 --config.steps=6 '--config.log_every=a b'"
      for eps in ("1", "8")]
  assert "each of these 2 runs spends its own privacy budget on the same data" in result.stderr
  assert "no jax" in result.stderr
  assert not os.path.exists(root)


@pytest.mark.parametrize("argv, message", [
    (["--sweep=steps=1"], "--config=configs/missing.py: no such file"),
    ([f"--config={CONFIG}", "--sweep=steps"], "--sweep=steps: expected FIELD=VALUE"),
    ([f"--config={CONFIG}", "--sweep=steps="], "the value list is empty"),
    ([f"--config={CONFIG}"], "required: --sweep"),
    ([f"--config={CONFIG}", "--sweep=steps=1", "--", "--workdir=x"], "--workdir is set by"),
    ([f"--config={CONFIG}", "--sweep=steps=1", "--", "--config.steps=2"],
     "--config.steps is swept"),
])
def test_bad_command_lines_are_one_line_errors(argv, message, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  if argv[0].startswith("--sweep"):
    argv = ["--config=configs/missing.py", *argv]
  status, out, err = _sweep_main(["--workdir_root=/nonexistent", *argv], capsys)
  assert status == 2 and not out
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_finished_runs_are_skipped(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  root = str(tmp_path)
  _write_ledger(os.path.join(root, "steps=1"), "completed", 3.5)
  _write_ledger(os.path.join(root, "steps=2"), "budget_exhausted", 8.0)
  _write_ledger(os.path.join(root, "steps=3"), "interrupted", 1.25)
  ran = []

  def run(cmd):  # the run goes on to the end
    ran.append(cmd)
    _write_ledger(cmd[4].split("=", 1)[1], "completed", 2.0)
    return 0

  status, out, err = _sweep_main([f"--config={CONFIG}", "--sweep=steps=1,2,3,4",
                                  f"--workdir_root={root}"], capsys, run=run)
  assert status == 0
  assert [cmd[4] for cmd in ran] == [f"--workdir={root}/steps=3", f"--workdir={root}/steps=4"]
  assert ran[0][0] == sys.executable and ran[0][1:3] == ["-m", "dpvl.main"]
  assert f"skip: {root}/steps=1 (completed, epsilon 3.5)" in err
  assert f"skip: {root}/steps=2 (budget_exhausted, epsilon 8)" in err
  assert "steps=3 (" not in err and len(out.splitlines()) == 2
  table = err.split("workdir", 1)[1].splitlines()
  assert table[1].split() == [f"{root}/steps=1", "skipped", "completed", "3.5"]
  assert table[3].split() == [f"{root}/steps=3", "ok", "completed", "2"]
  assert table[4].split() == [f"{root}/steps=4", "ok", "completed", "2"]


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  root = str(tmp_path)

  def run(cmd):
    workdir = cmd[4].split("=", 1)[1]
    if workdir.endswith("steps=1"):
      return 2
    _write_ledger(workdir, "completed", 2.0)
    return 0

  status, _, err = _sweep_main([f"--config={CONFIG}", "--sweep=steps=1,2",
                                f"--workdir_root={root}"], capsys, run=run)
  assert status == 1
  assert f"failed: {root}/steps=1 (exit status 2)" in err
  table = err.split("workdir", 1)[1].splitlines()
  assert table[1].split() == [f"{root}/steps=1", "failed", "(2)", "-", "-"]
  assert table[2].split() == [f"{root}/steps=2", "ok", "completed", "2"]


def test_an_interrupted_run_stops_the_sweep(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  ran = []
  status, _, err = _sweep_main([f"--config={CONFIG}", "--sweep=steps=1,2",
                                f"--workdir_root={tmp_path}"], capsys,
                               run=lambda cmd: ran.append(cmd) or 130)
  assert status == 130 and len(ran) == 1
  assert "not run" in err and "re-run the same command to resume it" in err


def test_a_run_stopped_by_sigterm_stops_the_sweep(tmp_path, capsys, monkeypatch):
  """A preempted run exits 0 with an "interrupted" ledger: not a finished run."""
  monkeypatch.chdir(ROOT)
  ran = []

  def run(cmd):
    ran.append(cmd)
    _write_ledger(cmd[4].split("=", 1)[1], "interrupted", 1.5)
    return 0

  status, _, err = _sweep_main([f"--config={CONFIG}", "--sweep=steps=1,2",
                                f"--workdir_root={tmp_path}"], capsys, run=run)
  assert status == 130 and len(ran) == 1
  assert f"interrupted: {tmp_path}/steps=1 (exit status 0, stopped with a checkpoint)" in err


def test_the_runs_are_real_processes(tmp_path):
  """With a stand-in dpvl.main (first in the child's sys.path): one run fails, the next runs."""
  (tmp_path / "dpvl").mkdir()
  (tmp_path / "dpvl" / "__init__.py").write_text("")
  (tmp_path / "dpvl" / "main.py").write_text(textwrap.dedent("""\
      import json, os, sys
      args = dict(a.split("=", 1) for a in sys.argv[1:])
      if args["--config.steps"] == "1":
        sys.exit("error: steps=1 fails")
      os.makedirs(args["--workdir"])
      with open(os.path.join(args["--workdir"], "privacy.json"), "w") as f:
        json.dump(dict(status="completed", epsilon_spent=float(args["--config.steps"])), f)
      print("trained", args["--workdir"])
      """))
  (tmp_path / "config.py").write_text("")
  result = subprocess.run([sys.executable, SWEEP, "--config=config.py", "--sweep=steps=1,2",
                           "--workdir_root=runs"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 1, result.stderr
  assert "trained runs/steps=2" in result.stdout
  assert "error: steps=1 fails" in result.stderr and "failed: runs/steps=1" in result.stderr
  result = subprocess.run([sys.executable, SWEEP, "--config=config.py", "--sweep=steps=2",
                           "--workdir_root=runs"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0 and not result.stdout
  assert "skip: runs/steps=2 (completed, epsilon 2)" in result.stderr


# The TPU pod and SLURM scripts.


def _bash(script, *args, env=None, path_dir=None):
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in (
               "DRY_RUN", "DETERMINISTIC", "XLA_FLAGS", "JAX_LOCAL_DEVICE_IDS", "PYTHON")}
  if path_dir:
    clean["PATH"] = f"{path_dir}{os.pathsep}{clean['PATH']}"
  clean.update(env or {})
  return subprocess.run(["bash", script, *args], cwd=ROOT, env=clean, capture_output=True,
                        text=True, timeout=60, check=False)


POD = ["--name=dpvl-v4-32", "--zone=us-central2-b", "--accelerator=v4-32",
       "--version=tpu-ubuntu2204-base"]
POD_ARGS = ["--", f"--config={CONFIG}", "--workdir=runs/pod", "--config.steps=6"]
GCLOUD = "gcloud compute tpus"
WHERE = "--zone=us-central2-b"


@needs_bash
def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  result = _bash(TPU_POD, *POD, "--dry-run", *POD_ARGS)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"{GCLOUD} tpu-vm describe dpvl-v4-32 {WHERE} --format='value(state,acceleratorType)' "
      f">/dev/null 2>&1 || {GCLOUD} tpu-vm create dpvl-v4-32 {WHERE} --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base",
      f"{GCLOUD} tpu-vm ssh dpvl-v4-32 {WHERE} --worker=all --command='mkdir -p dpvl'",
      f"{GCLOUD} tpu-vm scp dpvl configs setup.py pyproject.toml dpvl-v4-32:dpvl/ {WHERE} "
      "--worker=all --recurse",
      f"{GCLOUD} tpu-vm ssh dpvl-v4-32 {WHERE} --worker=all "
      "--command='cd dpvl && python3 -m pip install -q -e \".[tpu]\"'",
      f"{GCLOUD} tpu-vm ssh dpvl-v4-32 {WHERE} --worker=all --command='cd dpvl && "
      f"DPVL_DISTRIBUTED=1 python3 -m dpvl.main --config={CONFIG} --workdir=runs/pod "
      "--config.steps=6'"]


@needs_bash
def test_tpu_pod_queued_dry_run():
  result = _bash(TPU_POD, "--name", "dpvl-v4-32", *POD[1:], "--queued", "--spot",
                 "--project=p", "--skip-setup", "--dry-run", *POD_ARGS)
  assert result.returncode == 0, result.stderr
  where = f"{WHERE} --project=p"
  assert result.stdout.splitlines() == [
      f"{GCLOUD} queued-resources describe dpvl-v4-32 {where} --format='value(state.state)' "
      f">/dev/null 2>&1 || {GCLOUD} queued-resources create dpvl-v4-32 --node-id=dpvl-v4-32 "
      f"{where} --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot",
      f"{GCLOUD} tpu-vm ssh dpvl-v4-32 {where} --worker=all --command='cd dpvl && "
      f"DPVL_DISTRIBUTED=1 python3 -m dpvl.main --config={CONFIG} --workdir=runs/pod "
      "--config.steps=6'"]


@needs_bash
def test_tpu_pod_command_quotes_round_trip():
  odd = ["--config.init_from=a b's", "$HOME"]
  result = _bash(TPU_POD, *POD, "--dry-run", "--skip-setup", "--", f"--config={CONFIG}", *odd)
  assert result.returncode == 0, result.stderr
  # What the local shell passes to gcloud, then what the workers' shell passes to python3.
  split = lambda line: subprocess.run(
      ["bash", "-c", 'eval "a=($1)"; printf "%s\\n" "${a[@]}"', "split", line],
      capture_output=True, text=True, check=True).stdout.splitlines()
  remote = split(result.stdout.splitlines()[-1])[-1]
  assert remote.startswith("--command=cd dpvl && ")
  argv = split(remote[len("--command=cd dpvl && "):])
  assert argv == ["DPVL_DISTRIBUTED=1", "python3", "-m", "dpvl.main", f"--config={CONFIG}", *odd]


@needs_bash
@pytest.mark.parametrize("args, message", [
    (["--name=dpvl", "--dry-run", *POD_ARGS], "missing --zone --accelerator --version"),
    ([*POD, "--dry-run"], "nothing to run: pass the dpvl.main arguments after --"),
    ([*POD, "--dry-run", "--", "--config=configs/missing.py"], "configs/missing.py: no such file"),
    ([*POD, "--bogus", *POD_ARGS], "unknown option --bogus"),
    (["--name=Dpvl_1", *POD[1:], "--dry-run", *POD_ARGS], "--name=Dpvl_1: use lowercase"),
    ([*POD, "--copy=missing.txt", "--dry-run", *POD_ARGS], "missing.txt: no such file"),
])
def test_tpu_pod_refuses_bad_arguments(args, message):
  result = _bash(TPU_POD, *args)
  assert result.returncode == 2 and not result.stdout
  assert result.stderr.startswith("error: ") and message in result.stderr


def _fake_gcloud(tmp_path, describe):
  """A gcloud on PATH that logs its arguments; `describe` prints `describe` (or fails if None)."""
  log = tmp_path / "gcloud.log"
  script = tmp_path / "gcloud"
  answer = "exit 1" if describe is None else f"printf '%s\\n' '{describe}'"
  script.write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      printf 'gcloud %s\\n' "$*" >> {log}
      if [[ $* == *" describe "* ]]; then {answer}; fi
      """))
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return log


@needs_bash
def test_tpu_pod_creates_a_missing_slice_then_runs_on_all_workers(tmp_path):
  log = _fake_gcloud(tmp_path, describe=None)
  result = _bash(TPU_POD, *POD, *POD_ARGS, path_dir=tmp_path)
  assert result.returncode == 0, result.stderr
  calls = log.read_text().splitlines()
  assert [c.split(" dpvl-v4-32")[0] for c in calls] == [
      f"{GCLOUD} tpu-vm describe", f"{GCLOUD} tpu-vm create", f"{GCLOUD} tpu-vm ssh",
      f"{GCLOUD} tpu-vm scp dpvl configs setup.py pyproject.toml", f"{GCLOUD} tpu-vm ssh",
      f"{GCLOUD} tpu-vm ssh"]
  assert calls[-1].endswith(f"--command=cd dpvl && DPVL_DISTRIBUTED=1 python3 -m dpvl.main "
                            f"--config={CONFIG} "
                            "--workdir=runs/pod --config.steps=6")


@needs_bash
def test_tpu_pod_reuses_a_ready_slice_of_the_right_type(tmp_path):
  log = _fake_gcloud(tmp_path, describe="READY v4-32")
  result = _bash(TPU_POD, *POD, "--skip-setup", *POD_ARGS, path_dir=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "dpvl-v4-32 exists: reusing it" in result.stderr
  assert [c.split(" dpvl-v4-32")[0] for c in log.read_text().splitlines()] == [
      f"{GCLOUD} tpu-vm describe", f"{GCLOUD} tpu-vm ssh"]


@needs_bash
@pytest.mark.parametrize("describe, message", [
    ("READY v4-8", "dpvl-v4-32 is a v4-8, not a v4-32"),
    ("PREEMPTED v4-32", "dpvl-v4-32 is PREEMPTED, not READY"),
])
def test_tpu_pod_refuses_an_unusable_slice(tmp_path, describe, message):
  _fake_gcloud(tmp_path, describe=describe)
  result = _bash(TPU_POD, *POD, *POD_ARGS, path_dir=tmp_path)
  assert result.returncode == 2 and message in result.stderr


SRUN = "srun --ntasks-per-node=1 python -m dpvl.main"


@needs_bash
def test_slurm_dry_run_prints_the_srun_command():
  result = _bash(SLURM, f"--config={CONFIG}", "--workdir=runs/a b",
                 env=dict(DRY_RUN="1", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
      "export XLA_FLAGS=--xla_gpu_deterministic_ops=true",
      "export SRUN_CPUS_PER_TASK=16",
      f"{SRUN} --config={CONFIG} --workdir='runs/a b'"]


@needs_bash
def test_slurm_dry_run_flag_typed_gpus_and_existing_flags():
  result = _bash(SLURM, "--dry-run", f"--config={CONFIG}",
                 env=dict(SLURM_GPUS_PER_NODE="a100:2", XLA_FLAGS="--xla_foo=1", PYTHON="py3"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      "export JAX_LOCAL_DEVICE_IDS=0,1",
      "export XLA_FLAGS='--xla_foo=1 --xla_gpu_deterministic_ops=true'",
      f"srun --ntasks-per-node=1 py3 -m dpvl.main --config={CONFIG}"]


@needs_bash
def test_slurm_without_gpu_count_warns_and_deterministic_can_be_off():
  result = _bash(SLURM, f"--config={CONFIG}", env=dict(DRY_RUN="1", DETERMINISTIC="0"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [f"{SRUN} --config={CONFIG}"]
  assert "warning: the GPUs per node are unknown" in result.stderr


@needs_bash
@pytest.mark.parametrize("env, args, message", [
    ({}, [f"--config={CONFIG}"], "not in a SLURM job: submit it with sbatch"),
    ({"DRY_RUN": "1"}, [], "nothing to run"),
])
def test_slurm_refuses(env, args, message):
  result = _bash(SLURM, *args, env=env)
  assert result.returncode == 2 and message in result.stderr and not result.stdout
