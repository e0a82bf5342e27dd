"""Training on several meshes and processes (simulated CPU devices).

One process runs the demo on 1 device, on data=8 and on data=2 x fsdp=4 (the state sharded,
ghost clipping): the loss curves and parameters agree. A run of 2 processes x 4 devices through
the real multi-host path (`jax.distributed` on localhost), its state sharded over both
(fsdp=8), preempted by SIGTERM on process 1 and resumed, matches the data=8 run: same ledger,
loss curve and parameters (to the float32 sums' order); only process 0 speaks; a workdir
locked by another run is refused by every process. A single process preempted from
the command line exits 0 with a checkpoint."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpvl import checkpoint as checkpoint_lib

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
STEPS = 6

_CONFIG = f"""
from configs import evals
from tests.configs_for_tests import small_dpcap_config


def get_config():
  config = small_dpcap_config()
  config.steps, config.log_every, config.checkpoint_every = {STEPS}, 1, 100
  config.evals.probe = evals.scene_probe("label", blocks=1, train_size=64, test_size=32,
                                         image_size=16)
  config.evals.probe.steps = 50
  return config
"""

_MESHES = """
import json, os, sys, jax, ml_collections
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from config import get_config
from dpvl import checkpoint as checkpoint_lib
from dpvl import train
assert jax.device_count() == 8, jax.devices()
specs = {}
for name, mesh, devices, clipping in [
    ("one", dict(data=1), jax.devices()[:1], "vmap"), ("data8", dict(data=8), None, "vmap"),
    ("data2_fsdp4", dict(data=2, fsdp=4, fsdp_min_size=0), None, "ghost")]:
  config = get_config()
  config.mesh.update(mesh)
  config.privacy.clipping = clipping
  if name != "data8":  # the 2-process run's probes are compared with data8's only
    config.evals = ml_collections.ConfigDict()
  train.run(config, os.path.join(sys.argv[2], name), log=lambda *_: None, devices=devices)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(sys.argv[2], name, "checkpoints"))
  params = ckpt.restore_state_arrays()["params"]  # as saved: with the run's shardings
  specs[name] = sorted({str(p.sharding.spec) for p in jax.tree.leaves(params)})
  ckpt.close()
print(json.dumps(specs))
"""


# --mode=eval of the 2-process run's checkpoint by the paper-scale probe, its work split over
# both processes (each extracts half of each split; the head's batches span both).
_EVAL_CONFIG = _CONFIG.replace("def get_config():", "def training_config():") + """

import ml_collections


def get_config():
  config = training_config()
  scenes = lambda seed: dict(source="shape_scenes", size=256, image_size=16, seed=seed,
                             max_objects=1)
  config.evals = ml_collections.ConfigDict(dict(probe=dict(
      type="streamed_linear_probe", blocks=1, data=scenes(7), test_data=scenes(8),
      label_key="colour_label", num_classes=7, epochs=30, warmup_epochs=2, batch_size=64,
      base_learning_rate=2.0, optimizer="sgd", encode_batch=32, workers=2,
      split_over_hosts=True)))
  return config
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(config: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "dpvl.main", f"--config={config}", f"--workdir={workdir}",
          *flags]


def _env(devices: int) -> dict:
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
              PYTHONPATH=os.path.abspath(ROOT), PYTHONUNBUFFERED="1")


# The state sharded over all 8 devices, so that each process holds half of every leaf: the
# checkpoints are saved and restored in pieces from both processes.
_SHARDED = ("--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.fsdp_min_size=0")


def _two_processes(config: str, workdir: str, stop_after: int | None = None, *flags: str):
  """Runs the 2-process job (`_SHARDED`, and `flags`); with `stop_after`, SIGTERM to process 1
  once process 0 has logged that step. Returns [(returncode, stdout, stderr)] per process."""
  port = _free_port()
  procs = [subprocess.Popen(
      _command(config, workdir, f"--coordinator_address=localhost:{port}", "--num_processes=2",
               f"--process_id={i}", *_SHARDED, *flags),
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  lines = []
  try:
    if stop_after is not None:
      for line in procs[0].stdout:
        lines.append(line)
        if line.startswith(f"step {stop_after:>6}/"):
          procs[1].send_signal(signal.SIGTERM)
          break
    results = []
    for i, proc in enumerate(procs):
      out, err = proc.communicate(timeout=600)
      results.append((proc.returncode, ("".join(lines) if i == 0 else "") + out, err))
    return results
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()


# The pieces of the collectives library's connection message ("[Gloo] Rank 1 is connected to 1
# peer ranks. Expected number of connected peer ranks is : 1"), which its threads write to stdout
# in pieces, interleaved with each other and with dpvl's lines.
_GLOO = re.compile(r"\[Gloo\]|Rank|is|connected|to|peer|ranks|Expected|number|of|\d+|[.:\s]")


def _said(text: str) -> str:
  """What dpvl printed on a process's stdout: the lines that are more than pieces of the
  connection message."""
  return "\n".join(line.strip() for line in text.splitlines() if _GLOO.sub("", line))


def _losses(workdir: str) -> dict[int, float]:
  """{step: loss} of metrics.jsonl's training rows, each step written once."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [row for row in map(json.loads, f) if "epsilon" in row]
  assert len({row["step"] for row in rows}) == len(rows), "a step was written twice"
  return {row["step"]: row["private_data_diagnostics"]["loss"] for row in rows}


def _evals(workdir: str) -> dict[int, dict]:
  """{step: evaluation row without its timing}, each evaluated step written once."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [row for row in map(json.loads, f) if "eval_seconds" in row]
  assert len({row["step"] for row in rows}) == len(rows), "an evaluation was written twice"
  return {row["step"]: {k: v for k, v in row.items() if k != "eval_seconds"} for row in rows}


def _params(workdir: str) -> list[np.ndarray]:
  """The leaves of the final parameters, as numpy arrays."""
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  params = jax.tree.leaves(ckpt.restore_state_arrays()["params"])
  ckpt.close()
  return [np.asarray(p) for p in params]


@pytest.mark.slow
def test_meshes_and_processes_agree_through_preemption(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(_CONFIG)
  out = subprocess.run([sys.executable, "-c", _MESHES, str(config), str(tmp_path)], cwd=ROOT,
                       env=_env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  specs = json.loads(out.stdout.strip().splitlines()[-1])
  assert specs["one"] == specs["data8"] == ["P()"]
  assert "P('fsdp',)" in specs["data2_fsdp4"]  # the state was sharded
  for name in ("data8", "data2_fsdp4"):  # same batches and noise; float32 sums in other orders
    np.testing.assert_allclose(list(_losses(str(tmp_path / name)).values()),
                               list(_losses(one).values()), rtol=1e-4)
    for a, b in zip(_params(str(tmp_path / name)), _params(one), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  data8 = str(tmp_path / "data8")  # the 2-process run's reference: one process, 8 devices

  first = _two_processes(str(config), two, stop_after=2)
  for returncode, _, err in first:  # the preempted job exits 0 on every process
    assert returncode == 0, err[-3000:]
  said, silent = (_said(out) for _, out, _ in first)
  assert "SIGTERM" not in said and "stopped after step" in said  # process 1 had the signal
  assert silent == ""  # only process 0 speaks
  stopped = json.loads((tmp_path / "two" / "privacy.json").read_text())
  assert stopped["status"] == "interrupted" and 2 <= stopped["steps_done"] < STEPS
  assert not (tmp_path / "two" / "lock").exists()

  (tmp_path / "two" / "lock").write_text(json.dumps(dict(host=socket.gethostname(),
                                                         pid=os.getpid())))
  for returncode, _, err in _two_processes(str(config), two):  # a live holder: all refuse
    assert returncode == 2 and f"is in use by pid {os.getpid()}" in err, err[-3000:]
  (tmp_path / "two" / "lock").unlink()

  second = _two_processes(str(config), two)
  for returncode, _, err in second:
    assert returncode == 0, err[-3000:]
  assert f"resumed from step {stopped['steps_done']}" in second[0][1]
  assert _said(second[1][1]) == ""

  reference = json.loads((tmp_path / "data8" / "privacy.json").read_text())
  ledger = json.loads((tmp_path / "two" / "privacy.json").read_text())
  for field in ("status", "steps_done", "epsilon_spent", "fingerprint", "run_id"):
    assert ledger[field] == reference[field], field
  assert len(ledger["segments"]) == 1  # the resume replayed nothing: one segment
  # Evaluations: the parameters gathered from both processes, probed on process 0, once each
  # at the start and the end; at the start the parameters are the same bits on every mesh.
  probes, expected_probes = _evals(two), _evals(data8)
  assert sorted(probes) == sorted(expected_probes) == [0, STEPS]
  assert probes[0] == expected_probes[0] and set(probes[STEPS]) == set(expected_probes[STEPS])
  losses, expected = _losses(two), _losses(data8)
  assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-4)
  for a, b in zip(_params(two), _params(data8), strict=True):  # fsdp=8 against data=8
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  # The sharded checkpoint, evaluated by both processes sharing the probe's work.
  (tmp_path / "eval_config.py").write_text(_EVAL_CONFIG)
  evaluated = _two_processes(str(tmp_path / "eval_config.py"), two, None, "--mode=eval")
  for returncode, _, err in evaluated:
    assert returncode == 0, err[-3000:]
  row = json.loads(_said(evaluated[0][1]).splitlines()[-1])
  assert row["standalone"] and row["step"] == STEPS
  assert row["probe/train_examples"] == row["probe/test_examples"] == 256  # both halves
  assert row["probe/top1"] > 0.25  # seven colours: chance is 1/7 (one process: 0.40)
  written = [r for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text(
      ).splitlines()) if r.get("standalone")]
  assert len(written) == 1  # by the primary process only


@pytest.mark.slow
def test_sigterm_from_the_command_line_checkpoints_and_exits_0(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(_CONFIG)
  proc = subprocess.Popen(_command(str(config), str(tmp_path / "run")), cwd=ROOT, env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    said = []
    for line in proc.stdout:
      said.append(line)
      if line.startswith(f"step {2:>6}/"):
        proc.send_signal(signal.SIGTERM)
        break
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  said = "".join(said) + out
  ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
  assert ledger["status"] == "interrupted" and 2 <= ledger["steps_done"] < STEPS
  assert f"SIGTERM: stopped after step {ledger['steps_done']} with a checkpoint" in said
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  assert ckpt.latest_step() == ledger["steps_done"]
  ckpt.close()
