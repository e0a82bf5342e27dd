"""Entry point.

  python -m dpvl.main --config=configs/dpcap_tiny.py --workdir=/tmp/run
  python -m dpvl.main --config=configs/dpcap_laion233m.py --mode=account \\
      --config.privacy.target_epsilon=4

--mode=train (default) trains, resuming from the workdir's last checkpoint; --mode=account
prints the privacy plan as one JSON object and touches no data and no device; --mode=config
prints the resolved config (the file with every override applied) as JSON; --mode=eval runs
`config.evals` on the workdir's latest checkpoint (or --step) and prints the metrics as JSON;
--mode=compile compiles the full private step on abstract inputs (no data) for the local
devices and prints its parameter count and per-device FLOPs and memory as JSON; with
--topology=v5e-256 (or v4-128, v5e:16x16, ...) for the chips of that TPU slice, from any host
(libtpu needed: pip install "dpvl[tpu]"); --mode=audit trains canaries into a shortened run
of the config in WORKDIR/audit and prints the empirical epsilon lower bound next to the claimed
one as one JSON object, last (`dpvl.privacy.audit`; --audit_kind, --audit_canaries,
--audit_steps override its choices).
"""

import json
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dpvl import config as config_lib
from dpvl import dry_run
from dpvl import lock as lock_lib
from dpvl import train
from dpvl.data import errors as data_errors
from dpvl.evaluate import checkpoint as eval_checkpoint
from dpvl.parallel import hosts
from dpvl.privacy import ledger as ledger_lib
from dpvl.privacy import plan as plan_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, ledger, metrics).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "account", "config", "eval", "compile",
                                             "audit"],
                          "What to do.")
_AUDIT_KIND = flags.DEFINE_enum("audit_kind", "dirac", ["dirac", "input"],
                                "--mode=audit: gradient (dirac) or input-space canaries.")
_AUDIT_CANARIES = flags.DEFINE_integer("audit_canaries", None,
                                       "--mode=audit: canaries (default: min(1000, N / 4)).")
_AUDIT_STEPS = flags.DEFINE_integer("audit_steps", None,
                                    "--mode=audit: steps of the audit's run (default: chosen).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "--mode=compile: compile for this TPU slice (v5e-256, v4-128, v5e:16x16) "
    "instead of the local devices; needs libtpu.")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: latest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0's coordinator "
    "(with --num_processes and --process_id; default: detected from SLURM, Open MPI or a TPU "
    "slice).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process runs: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process runs: this process's number, from 0.")
_FORCE = flags.DEFINE_bool("force_resume", False,
                           "Resume even if the privacy plan changed (the ledger composes both).")
_RESTART = flags.DEFINE_bool(
    "force_restart", False, "Start over in a workdir whose checkpoints are lost; the ledger "
    "keeps the steps its privacy.json accounts for.")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_path() -> str:
  """The --config value on the command line (before flags are parsed)."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return ""


def _config_error(e: Exception) -> str:
  """One line for a config file or override that fails to load."""
  text = " ".join(str(e).replace("\\n", " ").split()).replace("\\'", "'")
  if "No such file or directory" in text:
    return f"--config={_config_path()}: no such file."
  if isinstance(e, AttributeError) and "get_config" in text:
    return f"--config={_config_path()} is not a config file (it has no get_config())."
  typo = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  if typo:
    return f"the config has no field {typo[2]!r}; did you mean {typo[1]!r}?"
  if isinstance(e, flags.Error):
    return text
  if isinstance(e, (KeyError, AttributeError)):
    return f"the config has no field {text.strip(chr(34) + chr(39))!r}."
  return f"the config cannot be loaded: {text}"


def _parse_flags(argv):
  """absl's flag parsing, with any error of a flag, a config file or an override in one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # whatever the config file raises
    _fail(_config_error(e))


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # libraries' INFO logs would bury the progress lines
    logging.set_verbosity(logging.WARNING)
  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except  # a missing or broken config file
    _fail(_config_error(e))
  try:
    if _MODE.value == "config":
      print(config.to_json_best_effort(indent=2, sort_keys=True))
      return
    if _MODE.value != "account":  # before anything touches a device
      hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    _fail(str(e))
  try:
    train.check_settings(config)
    if _TOPOLOGY.value and _MODE.value != "compile":
      raise config_lib.ConfigError("--topology is for --mode=compile only.")
    if _MODE.value == "account":
      if config_lib.get_field(config, "privacy.noise_multiplier", None) is None:
        print("calibrating the noise multiplier to the target epsilon...", file=sys.stderr)
      print(json.dumps(plan_lib.build_plan(config).summary(), indent=2))
      return
    if _MODE.value == "compile":
      devices = dry_run.topology_devices(_TOPOLOGY.value) if _TOPOLOGY.value else None
      print(json.dumps(dry_run.compile_step(config, devices), indent=2))
      return
    if not _WORKDIR.value:
      raise config_lib.ConfigError(f"--workdir is required for --mode={_MODE.value}.")
    if _MODE.value == "audit":
      from dpvl.privacy import audit  # pylint: disable=g-import-not-at-top  # jax_privacy
      result = audit.run(config, _WORKDIR.value, _AUDIT_KIND.value, _AUDIT_CANARIES.value,
                         _AUDIT_STEPS.value)
      print(json.dumps(result))
      return
    if _MODE.value == "eval":
      print(json.dumps(eval_checkpoint.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value)))
      return
    entry = train.run(config, _WORKDIR.value, force_resume=_FORCE.value,
                      force_restart=_RESTART.value)
    if entry.get("stopped_by") == "SIGINT":  # Ctrl-C; a preemption's SIGTERM exits 0
      sys.exit(130)
  except (config_lib.ConfigError, ledger_lib.ResumeError, lock_lib.LockedError,
          data_errors.TooManyBadRecords) as e:
    _fail(str(e))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
