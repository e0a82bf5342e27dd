"""Imports a published PyTorch checkpoint (ViP, DP-Cap) as a dpvl checkpoint.

  python -m dpvl.convert_checkpoint --from=ckpt-vip-syn-base.pth --to=runs/vip_syn_base \\
      --config=configs/vip_laion233m.py
  python -m dpvl.main --config=configs/vip_laion233m.py --workdir=runs/vip_syn_base --mode=eval

`--config` is the dpvl run config whose model receives the parameters (`config.objective`
picks the file layout: "vip_mae" for ViP's MAE files, "dpcap" for DP-Cap's); give the same
config, with the same overrides, to `--mode=eval`. The parameters are written as step 0 of
WORKDIR/checkpoints, with a meta item `imported` (`file`, `sha256`, `format`) and what the
import did besides exact copies (`initialised`, `ignored`, `approximations`).

An imported checkpoint is not a warm start (`config.init_from`) for a private run: dpvl cannot
see how it was trained, and a private model's budget would be forgotten by the new run's ledger.
`--public_data=NAME` declares that the file's model was trained without DP on public data only
(e.g. "Shaders21k" for ViP-Syn-Base); the declaration is recorded as the checkpoint's data
provenance, and refused if the file itself records DP training (`args.sigma`, `privacy_step`).
"""

import hashlib
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from dpvl import checkpoint as checkpoint_lib
from dpvl import config as config_lib
from dpvl import objectives
from dpvl.data import transforms
from dpvl.importers import official
from dpvl.importers import pth

FORMATS = {"vip_mae": "torch zip: ViP / MAE state dict (timm ViT encoder, MAE decoder)",
           "dpcap": "torch zip: DP-Cap captioner state dict"}
# Layout details of the file's model that dpvl's model has no exact equivalent for.
NOTES = {"dpcap": ["the file's text decoder LayerNorms use epsilon 1e-5, dpvl's 1e-6"]}


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def dp_evidence(obj) -> list[str]:
  """What in a loaded file says its model was trained with DP (DP-Cap's `privacy_step`, the
  training script's `args.sigma` or `args.DP`)."""
  if not isinstance(obj, dict):
    return []
  found = []
  if obj.get("privacy_step"):
    found.append(f"privacy_step={obj['privacy_step']}")
  args = obj.get("args")
  state = getattr(args, "state", None)
  if isinstance(state, dict):
    if isinstance(state.get("sigma"), (int, float)) and state["sigma"] > 0:
      found.append(f"args.sigma={state['sigma']}")
    if state.get("DP"):
      found.append(f"args.DP={state['DP']!r}")
  return found


def import_state(config, state: dict, options: official.Options,
                 notes: list[str] | None = None) -> official.Imported:
  """The parameters of `config.model` from the state dict `state` (see `dpvl.importers`)."""
  objective = objectives.build_objective(config)
  abstract = jax.eval_shape(objective.init, jax.random.key(0))
  model = config.model.to_dict()
  patch = model["encoder"]["patch_size"]
  grid = (objective.image_size // patch,) * 2
  norm = transforms.NORMALIZATIONS[getattr(objective, "normalization", "half")]
  if config.objective == "vip_mae":
    rules, ignorable = official.vip_mae_rules(model, grid, norm)
  elif config.objective == "dpcap":
    model["decoder"]["max_len"] = config.tokenizer.max_len
    rules, ignorable = official.dpcap_rules(model, grid, norm, official.text_length(state))
  else:
    raise config_lib.ConfigError(f"config.objective={config.objective!r}: only ViP ('vip_mae') "
                                 "and DP-Cap ('dpcap') checkpoints can be imported.")
  seed = config_lib.get_field(config, "seed", 0)
  fresh = lambda: jax.device_get(objective.init(jax.random.key(seed)))
  return official.apply_rules(state, abstract, rules, ignorable, options, fresh,
                              [*NOTES.get(config.objective, []), *(notes or [])])


def convert(config, source: str, workdir: str, *, state_key: str = "model",
            options: official.Options | None = None,
            public_data: str | None = None) -> dict:
  """Writes the parameters of `source` (a .pth file) as step 0 of WORKDIR/checkpoints.

  Returns:
    The meta written: `imported` (file, sha256, format), `initialised`, `ignored`,
    `approximations`, and `data` (a public declaration) when `public_data` is given.

  Raises:
    ConfigError: the workdir holds checkpoints already, or a public declaration contradicts
      the file. pth.PthError: the file cannot be read. official.ImportError_: it does not fit
      the config's model.
  """
  directory = os.path.join(workdir, "checkpoints")
  if os.path.exists(directory):
    raise config_lib.ConfigError(f"--to={workdir} holds a checkpoints/ directory already; "
                                 "import into a new directory.")
  obj = pth.load(source)
  state = pth.state_dict(obj, state_key)
  digest = sha256(source)
  evidence = dp_evidence(obj)
  if public_data and evidence:
    raise config_lib.ConfigError(
        f"--public_data: {source} records DP training ({', '.join(evidence)}); a private "
        "model cannot seed a run whose ledger starts at zero.")
  imported = import_state(config, state, options or official.Options())
  meta = dict(imported=dict(file=os.path.abspath(source), sha256=digest,
                            format=FORMATS[config.objective], state_key=state_key,
                            dp_evidence=evidence),
              initialised=imported.initialised, ignored=imported.ignored,
              approximations=imported.approximations)
  if public_data:
    meta["data"] = dict(source="imported", name=public_data, sha256=digest, public="declared")
  params = jax.tree.map(jnp.asarray, imported.params)
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    ckpt.save(0, dict(params=params), meta)
  finally:
    ckpt.close()
  return dict(meta, workdir=os.path.abspath(workdir), step=0,
              parameters=int(sum(np.size(x) for x in jax.tree.leaves(imported.params))))


def define_flags() -> dict:
  """The command's flags (defined when it runs, not on import: `dpvl.main` has a --config
  too)."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "dpvl config of the model to fill.",
                                             lock_config=True),
      source=flags.DEFINE_string("from", None,
                                 "The PyTorch checkpoint (.pth, torch.save's zip)."),
      to=flags.DEFINE_string("to", None, "Workdir to write (its checkpoints/ must not exist)."),
      state_key=flags.DEFINE_string("state_key", "model", "Entry of the file holding the "
                                    "state dict (the file itself if it is one)."),
      encoder_only=flags.DEFINE_bool(
          "encoder_only", False, "Import the image encoder only (ViP-Base's file): the other "
          "parameters keep a fresh initialisation from config.seed, recorded in the meta."),
      tolerate=flags.DEFINE_bool(
          "tolerate_posemb_drift", False, "Accept decoder or memory position tables that "
          "differ from dpvl's fixed sin-cos (the encoder and its evaluations stay exact); "
          "recorded in the meta."),
      public_data=flags.DEFINE_string(
          "public_data", None, "Declare that the file's model was trained WITHOUT DP on "
          "public data only (name it, e.g. Shaders21k): the import may then seed a private "
          "run's warm start."))


_FLAGS = {}  # define_flags(), when run as a command


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    value = {name: flag.value for name, flag in _FLAGS.items()}
    options = official.Options(encoder_only=value["encoder_only"],
                               tolerate_posemb_drift=value["tolerate"])
    row = convert(value["config"], value["source"], value["to"], state_key=value["state_key"],
                  options=options, public_data=value["public_data"])
  except (config_lib.ConfigError, pth.PthError, official.ImportError_, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(row, indent=2))


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  flags.mark_flags_as_required(["config", "from", "to"])
  app.run(main)
