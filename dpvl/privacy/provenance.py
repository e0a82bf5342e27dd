"""Provenance of training data, and the warm-start rule that rests on it.

A private run may start from another run's parameters (`config.init_from`) with its ledger at
zero only if that run, and every run it was itself warm-started from, touched no private data:
each trained without DP on a source that is public by construction (generated:
`sources.PUBLIC_BY_CONSTRUCTION`) or declared public by its config (`data.public = True`), and
none declared public the very data this run trains on privately. The train loop stores
`data_provenance(config.data)` in each checkpoint's meta (`"data"`) and in privacy.json, and
what `load_warm_start` returns under `"init_from"`, so that the chain can be checked later.
"""

import os

from etils import epath
import jax

from dpvl import checkpoint as checkpoint_lib
from dpvl import config as config_lib
from dpvl.data import sources

PUBLIC_BY_CONSTRUCTION = sources.PUBLIC_BY_CONSTRUCTION
# The fields of config.data that say which data a run read (with `source`).
IDENTIFYING = ("path", "name", "split", "data_dir", "size", "seed")
_LOCATIONS = ("path", "data_dir")  # recorded as absolute paths (URLs kept as they are)


def data_provenance(data_cfg) -> dict:
  """JSON record of the data a run trains on: `source`, the identifying fields it sets, and
  `public`: "by_construction", "declared" (`data.public = True`) or None (private)."""
  field = lambda name, default=None: config_lib.get_field(data_cfg, name, default)
  record = dict(source=field("source"))
  for name in IDENTIFYING:
    value = field(name)
    if value not in (None, ""):
      record[name] = _absolute(str(value)) if name in _LOCATIONS else value
  if record["source"] in PUBLIC_BY_CONSTRUCTION:
    record["public"] = "by_construction"
  else:
    record["public"] = "declared" if field("public", False) else None
  return record


def same_data(a: dict, b: dict) -> bool:
  """Whether two `data_provenance` records may share records: same source and overlapping
  paths (shards after `{a..b}` expansion), or the same dataset name and an overlapping split.
  Errs towards True: a source that no field identifies is the same as itself."""
  if a["source"] != b["source"]:
    return False
  if "path" in a or "path" in b:
    return bool(_members(a.get("path", "")) & _members(b.get("path", "")))
  if a.get("name") != b.get("name"):
    return False
  return not (a.get("split") and b.get("split")) or bool(
      _splits(a["split"]) & _splits(b["split"]))


def load_warm_start(workdir: str, abstract_params, data_cfg):
  """Parameters of the latest checkpoint in `workdir` for a warm start of a private run on
  `data_cfg` (config.data), and their provenance: `path`, `steps`, `private`, `data` (stage 1's
  `data_provenance`) and `chain` (the runs stage 1 was warm-started from, nearest first).

  Raises ConfigError, in one sentence, unless stage 1 and each link of its chain trained without
  DP on public data (see the module docstring) and the parameters fit `abstract_params`.

  Args:
    workdir: the stage-1 run's directory (`config.init_from`); its checkpoints are read only.
    abstract_params: the structure, shapes and dtypes this run's parameters have.
    data_cfg: this run's `config.data`, which stage 1's data must not overlap.

  Returns:
    (params of stage 1's latest checkpoint, on this host's first device; provenance dict with
    `path`, `steps`, `private`, `data` and `chain`).

  Raises:
    ConfigError: if `workdir` holds no checkpoint, stage 1 or a link of its chain is not a
      non-private run on public data other than this run's, or its model differs.
  """
  where = f"config.init_from={workdir!r}"
  directory = os.path.join(workdir, "checkpoints")
  if not epath.Path(directory).exists():
    raise config_lib.ConfigError(f"{where} holds no checkpoint.")
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    if ckpt.latest_step() is None:
      raise config_lib.ConfigError(f"{where} holds no checkpoint.")
    meta = ckpt.restore_meta()
    _check_imported(meta, where)
    ledger = meta.get("ledger") or {}
    recorded = lambda key: meta.get(key, ledger.get(key))  # in the meta or in its ledger
    stage1 = dict(path=_absolute_one(workdir), steps=ledger.get("steps_done"),
                  private=bool(ledger.get("private")), data=recorded("data"))
    this_data = data_provenance(data_cfg)
    _check(dict(stage1, simulation=bool(ledger.get("simulation"))), this_data, where + " ",
           ledger.get("epsilon_spent"),
           max(ledger.get("steps_done") or 0, ledger.get("steps_accounted") or 0))
    parent = recorded("init_from")
    chain = [] if not parent else [
        {k: parent.get(k) for k in ("path", "steps", "private", "data")}, *parent.get("chain", [])]
    for link in chain:
      _check(link, this_data, f"{where} descends from {link.get('path')!r} (its warm-start "
             "chain), which ")
    params = ckpt.restore_state_arrays()["params"]
  finally:
    ckpt.close()
  if not same_model(params, abstract_params):
    raise config_lib.ConfigError(f"{where} has parameters of another model than config.model.")
  return params, dict(stage1, chain=chain)


def same_model(params, abstract_params) -> bool:
  """Whether `params` have the structure, shapes and dtypes of `abstract_params`."""
  describe = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
  return describe(params) == describe(abstract_params)


def _check_imported(meta: dict, where: str) -> None:
  """ConfigError for parameters imported from another code base (`dpvl.convert_checkpoint`)
  unless the import declares them trained without DP on public data (`--public_data`)."""
  imported = meta.get("imported")
  if imported is None or isinstance(meta.get("data"), dict):
    return
  raise config_lib.ConfigError(
      f"{where} holds parameters imported from {imported.get('file')} (sha256 "
      f"{str(imported.get('sha256'))[:16]}...), whose training dpvl cannot check: if it was "
      "private, this run's fresh ledger would forget its budget; warm-start only from an "
      "import declared non-private on public data (python -m dpvl.convert_checkpoint "
      "--public_data=NAME).")


def _check(link: dict, this_data: dict, subject: str, epsilon=None, dp_steps=None) -> None:
  """Raises ConfigError ("<subject><reason>; <fix>.") unless `link` may seed this run.
  `dp_steps`: the steps its ledger accounts, if more than `link["steps"]`."""
  data = link.get("data")
  dp_steps = max(dp_steps or 0, link.get("steps") or 0)
  if link.get("simulation"):
    reason = ("is a TAN simulation (config.tan): it trained on its data with too little noise "
              "for any privacy guarantee")
    fix = "a simulation only predicts a run's utility: warm-start from a real run"
  elif link.get("private") and dp_steps > 0:
    spent = "" if epsilon is None else f" (epsilon {epsilon})"
    reason = (f"was trained with DP for {dp_steps} steps{spent}, a budget that this run's "
              "fresh ledger would forget")
    fix = "warm-start only from a non-private run on public data, or resume that run instead"
  elif not isinstance(data, dict) or "source" not in data:
    reason = ("records no data provenance (written by older code), so nothing shows that it "
              "touched no private data")
    fix = "retrain it with this version of dpvl, which records its data"
  elif not (data.get("public") == "declared" or (data.get("public") == "by_construction"
                                                  and data["source"] in PUBLIC_BY_CONSTRUCTION)):
    reason = f"was trained on {_describe(data)}, which is private"
    fix = ("a warm start must come from runs on a generated source "
           f"({', '.join(sorted(PUBLIC_BY_CONSTRUCTION))}) or on public data declared so in "
           "their config with config.data.public = True")
  elif data["public"] == "declared" and same_data(data, this_data):
    reason = (f"was trained on {_describe(data)}, declared public, but that is the data this "
              "run trains on privately")
    fix = "train stage 1 on other, truly public data, or drop config.init_from"
  else:
    return
  raise config_lib.ConfigError(f"{subject}{reason}; {fix}.")


def _describe(data: dict) -> str:
  fields = [f"data.source={data['source']!r}"] + [
      f"data.{k}={data[k]!r}" for k in ("path", "name", "split") if k in data]
  return ", ".join(fields)


def _absolute(path: str) -> str:
  """`path` (comma-separated parts allowed) with local parts made absolute; URLs unchanged."""
  return ",".join(_absolute_one(p) for p in (p.strip() for p in path.split(",")) if p)


def _absolute_one(path: str) -> str:
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _members(path: str) -> set[str]:
  """The shard names of a path spec, `{000..099}` ranges expanded; globs kept as written."""
  from dpvl.data import webdataset  # pylint: disable=g-import-not-at-top
  out = set()
  for part in (p.strip() for p in path.split(",")):
    if part:
      out.update([part] if any(c in part for c in "*?[") else webdataset.expand_shards(part))
  return out


def _splits(split: str) -> set[str]:
  """The base split names of a TFDS split spec: "train[:10%]+validation" -> {train, validation}."""
  return {s.split("[")[0].strip() for s in split.split("+")}
