"""The code passes the linter: ruff with the settings in pyproject.toml (as CI runs it)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_ruff_finds_nothing():
  out = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "dpvl", "tests", "configs", "benchmarks", "launch"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
