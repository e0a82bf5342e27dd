"""Fixtures shared by all tests: small configs, a BERT-sized vocabulary, the command line.

The small configs are built by tests/configs_for_tests.py; a fixture returns the builder, so a
test asks for `dpcap_config` and calls it with its overrides: `dpcap_config(enabled=False)`.
"""

import os
import subprocess
import sys

# Tests compile many small programs and run each a few times: LLVM's optimisation level 0
# halves XLA's CPU compile time (the programs compute the same). Subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

from tests import configs_for_tests

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Tests build many identical train steps: share their compilations through JAX's persistent
# cache (a fresh directory per test session).
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dpvl-jax-cache-{os.getpid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def dpcap_config():
  """Builder of the demo DP-Cap config shrunk to run a few steps in seconds.

  `dpcap_config(**privacy)` returns a fresh config; `privacy` sets fields of config.privacy.
  """
  return configs_for_tests.small_dpcap_config


@pytest.fixture(scope="session")
def dpclip_config():
  """Builder of the demo DP-CLIP config shrunk to run a few steps in seconds.

  `dpclip_config(mechanism="per_batch", **privacy)` returns a fresh config.
  """
  return configs_for_tests.small_dpclip_config


@pytest.fixture
def bert_sized_vocab(tmp_path) -> str:
  """Path of a word-piece vocab.txt with the public BERT vocabulary's size (30,522)."""
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                             [f"w{i}" for i in range(30_522 - 4)]) + "\n")
  return str(vocab)


@pytest.fixture(scope="session")
def cli():
  """Runs `python -m dpvl.main` in the repository root: `cli(*args, env=None)`.

  Returns the subprocess.CompletedProcess (stdout and stderr as text); `env` adds variables to
  this process's environment.
  """

  def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dpvl.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))

  return run
