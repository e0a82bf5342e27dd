"""The command line (dpvl/main.py): account mode, and config mistakes reported in one line
with exit status 2, before any compute."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_account_mode_reproduces_the_dpcap_row(cli):
  # JAX_PLATFORMS names a backend this machine lacks: any device use would fail the command.
  out = cli("--config=configs/dpcap_laion233m.py", "--mode=account",
            "--config.privacy.noise_multiplier=0.728", "--config.data.size=233000000",
            env=dict(JAX_PLATFORMS="tpu"))  # the published row's N
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout)
  assert summary["steps"] == 5_708 and summary["expected_batch_size"] == 1_310_720
  assert summary["epsilon_rdp"] == pytest.approx(8.073, abs=1e-3)
  assert summary["epsilon_pld"] == pytest.approx(7.360, abs=1e-3)
  assert summary["epsilon_planned"] == summary["epsilon_pld"]


@pytest.mark.parametrize("override, field", [
    ("--config.objective=vae", "config.objective"),
    ("--config.batch.expected_size=30000", "config.batch.expected_size"),
    ("--config.privacy.delta=0.01", "config.privacy.delta"),
    ("--config.privacy.target_epsilon=0.00001", "config.privacy.target_epsilon"),
])
def test_cli_bad_config_fails_with_one_sentence(override, field, cli):
  out = cli("--config=configs/dpcap_tiny.py", "--mode=account", override)
  assert out.returncode == 2
  assert field in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such file."),
    (["--config=configs/evals.py"], "is not a config file"),
    (["--config=configs/dpcap_tiny.py", "--config.privacy.target_epsilonn=3"],
     "no field 'target_epsilonn'; did you mean 'target_epsilon'?"),
])
def test_cli_bad_config_file_or_override_fails_with_one_line(args, message, cli):
  out = cli(*args, "--mode=account")
  assert out.returncode == 2 and message in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _cli_error(tmp_path, config, *overrides):
  out = subprocess.run(
      [sys.executable, "-m", "dpvl.main", f"--config=configs/{config}",
       f"--workdir={tmp_path / 'run'}", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=60,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert not os.path.exists(tmp_path / "run")
  return lines[0]


def test_cli_num_heads_not_dividing_the_width(tmp_path):
  # A fixed noise multiplier: no calibration runs before the objective is built.
  line = _cli_error(tmp_path, "dpcap_tiny.py", "--config.model.encoder.num_heads=3",
                    "--config.privacy.noise_multiplier=1.0")
  assert "config.model.encoder.width=64 is not divisible by" in line, line


def test_cli_array_record_directory_without_index(tmp_path):
  (tmp_path / "data").mkdir()
  # dpcap_webdata_tiny: dpcap_tiny with the data.path field (a locked config adds none).
  line = _cli_error(tmp_path, "dpcap_webdata_tiny.py", "--config.data.source=array_record",
                    f"--config.data.path={tmp_path / 'data'}")
  assert "has no index.json" in line, line
