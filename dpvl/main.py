"""Entry point.

  python -m dpvl.main --config=configs/dpcap_tiny.py --workdir=/tmp/run
  python -m dpvl.main --config=configs/dpcap_laion233m.py --mode=account \\
      --config.privacy.target_epsilon=4

--mode=train (default) trains, resuming from the workdir's last checkpoint; --mode=account
prints the privacy plan as one JSON object and touches no data and no device; --mode=eval runs
`config.evals` on the workdir's latest checkpoint (or --step) and prints the metrics as JSON.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dpvl import lock as lock_lib
from dpvl import objectives
from dpvl import train
from dpvl.data import errors as data_errors
from dpvl.data import sources
from dpvl.privacy import ledger as ledger_lib
from dpvl.privacy import plan as plan_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, ledger, metrics).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "account", "eval"], "What to do.")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: latest).")
_FORCE = flags.DEFINE_bool("force_resume", False,
                           "Resume even if the privacy plan changed (the ledger composes both).")
_RESTART = flags.DEFINE_bool(
    "force_restart", False, "Start over in a workdir whose checkpoints are lost; the ledger "
    "keeps the steps its privacy.json accounts for.")


def check_config(config) -> None:
  """Checks the parts of the config that the privacy plan does not; raises ConfigError."""
  name = plan_lib.get_field(config, "objective")
  if name not in objectives.REGISTRY:
    raise plan_lib.ConfigError(f"config.objective={name!r} is unknown; choose one of "
                               f"{sorted(objectives.REGISTRY)}.")
  source = plan_lib.get_field(config, "data.source")
  if source not in sources.REGISTRY:
    raise plan_lib.ConfigError(f"config.data.source={source!r} is unknown; choose one of "
                               f"{sorted(sources.REGISTRY)}.")
  for field in ("seed", "log_every", "checkpoint_every", "optimizer.learning_rate",
                "optimizer.warmup_steps", "optimizer.b1", "optimizer.b2",
                "optimizer.weight_decay"):
    plan_lib.get_field(config, field)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # libraries' INFO logs would bury the progress lines
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    check_config(config)
    if _MODE.value == "account":
      print(json.dumps(plan_lib.build_plan(config).summary(), indent=2))
      return
    if not _WORKDIR.value:
      raise plan_lib.ConfigError(f"--workdir is required for --mode={_MODE.value}.")
    if _MODE.value == "eval":
      print(json.dumps(train.evaluate_checkpoint(config, _WORKDIR.value, _STEP.value)))
      return
    entry = train.run(config, _WORKDIR.value, force_resume=_FORCE.value,
                      force_restart=_RESTART.value)
    if entry["status"] == "interrupted":
      sys.exit(130)
  except (plan_lib.ConfigError, ledger_lib.ResumeError, lock_lib.LockedError,
          data_errors.TooManyBadRecords) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
