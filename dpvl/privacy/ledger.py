"""The privacy ledger: every step a run has released, in segments, and the epsilon they spend.

A run is a list of segments. A segment is a stretch of consecutive steps run by one
computation, one privacy plan (`PrivacyPlan.fingerprint`) and one computation fingerprint
(`computation_fingerprint`: everything else that decides a step's clean gradient), with random
streams of its own (`secrets.RunSecrets`, keyed by the segment's index). Its record holds its
first global step, the steps it released and the accounting parameters of its plan; the epsilon
of a run is that of all its segments composed. The rules that make the ledger the truth:

* privacy.json is written before anything of a step is released (a metrics row, an
  evaluation, a checkpoint), so it never counts fewer steps than were released;
* on resume, the segments come from the checkpoint and privacy.json (whichever has accounted
  more), never from the config;
* a resume from the checkpoint at step s continues the last segment only if it recomputes that
  segment's steps bit for bit: the same plan, the same computation fingerprint, and s at or
  after the segment's start. Otherwise a new segment starts at s with fresh sampling, noise and
  groups, and the last segment keeps every step it released, those after s included: they were
  released once and are now run again with fresh noise on a different clean gradient, so both
  count (the same noise on two different clean gradients would release their difference);
* a changed privacy plan needs the user's explicit `force` to compose the two plans.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
from typing import Sequence

import jax

from dpvl import config as config_lib
from dpvl import jsonfile
from dpvl import metrics as metrics_lib
from dpvl.parallel import hosts
from dpvl.privacy import accounting
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import secrets as secrets_lib

# Config fields that do not change what a step computes: changing them keeps a segment going.
OPERATIONAL_FIELDS = ("log_every", "checkpoint_every", "evals", "data.workers", "privacy.seed",
                      "log_private_diagnostics")
# Ledger fields fixed when a run starts, kept as they are on resume.
HEADER_FIELDS = ("run_id", "secrets", "data", "init_from", "earlier_runs")


class ResumeError(RuntimeError):
  """A workdir whose checkpoint cannot be resumed under this config without breaking its
  ledger."""


@dataclasses.dataclass(frozen=True)
class Record:
  """A segment of the ledger: `segment.steps` steps released from global step `start` on."""

  start: int
  segment: accounting.Segment
  plan: dict          # PrivacyPlan.fingerprint() of the plan that ran it
  computation: str    # computation_fingerprint() of what ran it

  @property
  def end(self) -> int:
    return self.start + self.segment.steps

  def to_json(self) -> dict:
    return dict(start=self.start, **dataclasses.asdict(self.segment), plan=self.plan,
                computation=self.computation)

  @classmethod
  def from_json(cls, d: dict) -> "Record":
    d = dict(d)  # a privacy.json of an earlier dpvl has no start, plan or computation
    start, plan, computation = d.pop("start", 0), d.pop("plan", {}), d.pop("computation", "")
    return cls(start, accounting.Segment(**d), plan, computation)


def _without(tree: dict, dotted: str) -> None:
  *parents, leaf = dotted.split(".")
  for part in parents:
    tree = tree.get(part)
    if not isinstance(tree, dict):
      return
  tree.pop(leaf, None)


def config_tree(config) -> dict:
  """An ml_collections config as a JSON tree."""
  return json.loads(config.to_json_best_effort())


def computation_config(tree: dict) -> dict:
  """A config tree without `OPERATIONAL_FIELDS`."""
  tree = json.loads(json.dumps(tree))
  for field in OPERATIONAL_FIELDS:
    _without(tree, field)
  return tree


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields in which two config trees differ (`OPERATIONAL_FIELDS` too).

  Args:
    old: a config tree (`config_tree`), e.g. the one a checkpoint was made under.
    new: the config tree to compare with it.
    prefix: prepended to every name (the dotted path of the subtrees compared).

  Returns:
    The sorted dotted names; a field present in one tree only counts as changed.
  """
  changes = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changes += config_changes(a, b, f"{prefix}{key}.")
    elif a != b:
      changes.append(f"{prefix}{key}")
  return changes


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
  """SHA-256 of dpvl's own source files."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digest = hashlib.sha256()
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          digest.update(f.read())
  return digest.hexdigest()


def deterministic_platform() -> bool:
  """Whether XLA recomputes a step bit for bit here: CPU and TPU do; GPUs only with
  `--xla_gpu_deterministic_ops=true` in XLA_FLAGS (scatter and reduction order otherwise vary)."""
  if jax.default_backend() != "gpu":
    return True
  return "--xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", "")


def computation_fingerprint(config) -> str:
  """SHA-256 of everything that decides the clean gradients and updates of a run's steps.

  The config (but `OPERATIONAL_FIELDS`: model, optimizer, data, objective, privacy plan,
  batch layout), dpvl's source code, the versions of the numerical libraries and the platform
  (backend, device kind and count, processes). Where the platform is not deterministic a random
  nonce is mixed in: no resume there ever reuses a segment's noise. The data files' contents are
  not covered: replacing the records under an unchanged config is the user's to avoid.
  """
  versions = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax",
                                                          "numpy")}
  devices = jax.devices()
  platform = dict(backend=jax.default_backend(), device_kind=devices[0].device_kind,
                  devices=len(devices), processes=jax.process_count())
  if not deterministic_platform():
    platform["nonce"] = os.urandom(16).hex()
  blob = json.dumps(dict(config=computation_config(config_tree(config)), source=_source_digest(),
                         versions=versions, platform=platform), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Resume:
  """How a run goes on from its checkpoint: after the `closed` segments, the current segment
  starts at global step `start` and has already released `released` steps."""

  closed: tuple[Record, ...]
  start: int
  released: int

  @property
  def segment_index(self) -> int:
    """The index of the current segment: it keys the segment's random streams."""
    return len(self.closed)

  def abandoned(self) -> int:
    """Steps released by the last closed segment after this segment's start (0 if none)."""
    return max(0, self.closed[-1].end - self.start) if self.closed else 0


def plan_changes(old: dict, new: dict) -> list[str]:
  """'field old -> new' for each field of two plan fingerprints that differs."""
  return [f"{k} {old.get(k)} -> {new.get(k)}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def resume(records: Sequence[Record], checkpoint_step: int, plan: dict, computation: str,
           force: bool = False) -> Resume:
  """Continues the last segment if it is recomputed bit for bit from `checkpoint_step`, or
  starts a new one there (see the module docstring). Raises ResumeError for a changed privacy
  plan unless `force`.

  Args:
    records: the ledger's segments (`latest` of the checkpoint's and privacy.json's), in order.
    checkpoint_step: the global step of the checkpoint the run resumes from.
    plan: the fingerprint (`PrivacyPlan.fingerprint`) of the plan the run resumes under.
    computation: the `computation_fingerprint` of what the run resumes with.
    force: compose a changed privacy plan with the old one instead of refusing.

  Returns:
    A `Resume`: the last segment continued (its start, every step it released) when plan and
    computation match and it started at or before `checkpoint_step`; else every record closed
    and a new segment from `checkpoint_step`, nothing released. No records: a first segment
    from `checkpoint_step`.

  Raises:
    ResumeError: if the privacy plan changed and not `force`.
  """
  if not records:
    return Resume((), checkpoint_step, 0)
  last = records[-1]
  if (last.plan == plan and last.computation == computation
      and last.start <= checkpoint_step):
    return Resume(tuple(records[:-1]), last.start, last.segment.steps)
  changes = plan_changes(last.plan, plan)
  if changes and not force:
    raise ResumeError(
        f"the checkpoint was made under another privacy plan (changed: {', '.join(changes)}); "
        "resuming would break its ledger. Use a new --workdir, or --force_resume to compose "
        "both plans.")
  return Resume(tuple(records), checkpoint_step, 0)


def read(path: str) -> dict | None:
  """The ledger entry in `path` (privacy.json), or None if there is none."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def records_of(entry: dict) -> list[Record]:
  return [Record.from_json(s) for s in entry["segments"]]


def accounted_steps(entry: dict) -> int:
  """All steps an entry accounts for, in every segment (replayed steps counted twice)."""
  return sum(s["steps"] for s in entry["segments"])


def latest(checkpointed: dict, on_disk: dict | None) -> dict:
  """The further of a checkpoint's ledger entry and privacy.json's (written first, so normally
  privacy.json's). Raises ResumeError if privacy.json belongs to another run."""
  if on_disk is None:
    return checkpointed
  if on_disk.get("run_id") != checkpointed.get("run_id"):
    raise ResumeError(
        f"privacy.json belongs to another run (run id {on_disk.get('run_id')}) than the "
        f"checkpoints (run id {checkpointed.get('run_id')}); resuming would lose one ledger. "
        "Use a new --workdir.")
  return on_disk if accounted_steps(on_disk) >= accounted_steps(checkpointed) else checkpointed


class Ledger:
  """privacy.json: the plan, the segments and the epsilon they spend, always on disk."""

  def __init__(self, path: str, plan, resumed: Resume, computation: str, header: dict):
    """`plan`: the current segment's PrivacyPlan (built with the closed segments as `done`);
    `header`: fields written as they are (run id, data provenance, warm start)."""
    self.path = path
    self.plan = plan
    self.closed = resumed.closed
    self.start = resumed.start
    self.released = resumed.released
    self.computation = computation
    self.header = header
    self.summary = plan.summary()

  @property
  def step(self) -> int:
    """The global step up to which this segment has released."""
    return self.start + self.released

  def advance(self, step: int) -> None:
    """Steps up to global step `step` are done (a replayed step is not counted twice)."""
    self.released = max(self.released, step - self.start)

  def records(self) -> list[Record]:
    current = Record(self.start, self.plan.segment(self.released), self.plan.fingerprint(),
                     self.computation)
    return [*self.closed, current]

  def epsilon(self, accountant: str | None = None) -> float:
    """Epsilon spent by every released step (the plan's accountant unless named)."""
    if not self.plan.guaranteed:
      return math.inf
    return accounting.epsilon(accountant or self.plan.accountant,
                              [r.segment for r in self.records()], self.plan.delta)

  def entry(self, status: str) -> dict:
    spent = {f"epsilon_spent_{a}": accounting.finite_or_none(self.epsilon(a))
             for a in accounting.ACCOUNTANTS}
    records = self.records()
    return dict(self.summary, **self.header, steps_done=self.step,
                steps_accounted=sum(r.segment.steps for r in records), status=status,
                epsilon_spent=spent[f"epsilon_spent_{self.plan.accountant}"], **spent,
                segments=[r.to_json() for r in records], fingerprint=self.plan.fingerprint(),
                computation=self.computation)

  def write(self, status: str) -> dict:
    """Writes privacy.json (atomically; on the primary process only) and returns its entry."""
    entry = self.entry(status)
    if hosts.is_primary():
      jsonfile.write_atomic(self.path, entry)
    return entry


@dataclasses.dataclass(frozen=True)
class Opening:
  """How a run opens its workdir.

  Attributes:
    secrets: the run's secrets (drawn now, or restored from the checkpoint).
    header: the ledger's fixed fields (`HEADER_FIELDS`) so far.
    resumed: the closed segments and where the current one starts.
    plan: the current segment's plan, with the closed segments as `done`.
    complete: the ledger entry of a run with nothing left to do (then nothing else is set up).
  """

  secrets: secrets_lib.RunSecrets
  header: dict
  resumed: Resume
  plan: plan_lib.PrivacyPlan
  complete: dict | None = None


def _spent_without_checkpoint(workdir: str, on_disk: dict | None, force_restart: bool,
                              log) -> tuple[Record, ...]:
  """The records of a workdir without a checkpoint: () if it spent nothing. Its spending is
  never forgotten: a restart is refused unless `force_restart`, which composes it."""
  if on_disk is None:
    shown = metrics_lib.last_training_row(workdir).get("step", 0)
    if shown:
      raise ResumeError(
          f"{workdir} has no checkpoint and no privacy.json, but its metrics.jsonl shows {shown} "
          "steps trained, whose spending cannot be accounted; restore the checkpoints or "
          "privacy.json, or use a new --workdir.")
    return ()
  spent = accounted_steps(on_disk)
  if spent == 0:
    return ()
  if not force_restart:
    raise ResumeError(
        f"{workdir} has no checkpoint to resume from, but its ledger (privacy.json) accounts "
        f"for {spent} steps (epsilon {on_disk.get('epsilon_spent')}) that starting over would "
        "forget; restore the checkpoints, use a new --workdir, or pass --force_restart to start "
        "over with that spending composed into the new ledger.")
  log(f"--force_restart: starting over; the {spent} steps in privacy.json (epsilon "
      f"{on_disk.get('epsilon_spent')}) stay in the ledger.")
  return tuple(records_of(on_disk))


def _fresh(config, workdir: str, plan, on_disk: dict | None, force_restart: bool,
           log) -> Opening:
  """A run without a checkpoint: new secrets; any earlier spending composed (see above)."""
  earlier = _spent_without_checkpoint(workdir, on_disk, force_restart, log)
  test_seed = config_lib.get_field(config, "privacy.seed", None)
  if test_seed is None:
    run_secrets = secrets_lib.RunSecrets.draw()
  else:
    run_secrets = secrets_lib.RunSecrets.from_test_seed(test_seed)
    log("config.privacy.seed is set: whoever knows it can reproduce the sampling and the "
        "noise, so the run is private only against those who do not (for tests).")
  header = dict(run_id=run_secrets.run_id,
                secrets="os" if test_seed is None else "config.privacy.seed")
  if earlier:
    header["earlier_runs"] = [on_disk.get("run_id"), *on_disk.get("earlier_runs", [])]
    plan = plan_lib.build_plan(config, [r.segment for r in earlier])
  return Opening(run_secrets, header, Resume(earlier, 0, 0), plan)


def _restored_secrets(meta: dict, workdir: str) -> secrets_lib.RunSecrets:
  if "secrets" not in meta:
    raise ResumeError(
        f"the checkpoint in {workdir} holds a seed from an earlier dpvl whose noise key kept "
        "only 32 bits of it; it cannot be resumed safely. Use a new --workdir.")
  return secrets_lib.RunSecrets.from_hex(meta["secrets"])


def _continued(config, workdir: str, plan, checkpoint_step: int, meta: dict,
               on_disk: dict | None, force_resume: bool, log) -> Opening:
  """A run resumed from its checkpoint at `checkpoint_step` (see the module docstring)."""
  run_secrets = _restored_secrets(meta, workdir)
  entry = latest(meta["ledger"], on_disk)
  header = {k: entry[k] for k in HEADER_FIELDS if k in entry}
  records = records_of(entry)
  shown = metrics_lib.last_training_row(workdir).get("step", 0)
  if shown > records[-1].end:  # privacy.json lost or behind: the metrics show what was released
    log(f"metrics.jsonl shows step {shown}, after the ledger's step {records[-1].end}: the "
        "ledger counts up to it.")
    last = records[-1]
    records[-1] = dataclasses.replace(last, segment=last.segment.replace(steps=shown - last.start))
  if records[-1].plan == plan.fingerprint():
    went_on = plan_lib.build_plan(config, [r.segment for r in records[:-1]], records[-1].start)
    if checkpoint_step >= went_on.steps:
      spent = entry["epsilon_spent"]
      log(f"the run in {workdir} is complete ({entry['status']}, {entry['steps_done']} "
          f"steps, epsilon {'inf' if spent is None else f'{spent:.4g}'}); nothing to do.")
      return Opening(run_secrets, header, Resume(tuple(records), checkpoint_step, 0), plan,
                     complete=entry)
  test_seed = config_lib.get_field(config, "privacy.seed", None)
  if test_seed is not None and (secrets_lib.RunSecrets.from_test_seed(test_seed).run_id
                                != run_secrets.run_id):
    log("config.privacy.seed differs from the seed this run started with; the run keeps "
        "its own secrets.")
  computation = computation_fingerprint(config)
  resumed = resume(records, checkpoint_step, plan.fingerprint(), computation, force_resume)
  plan = plan_lib.build_plan(config, [r.segment for r in resumed.closed], resumed.start)
  if len(resumed.closed) == len(records):  # a new segment
    last = records[-1]
    changes = plan_changes(last.plan, plan.fingerprint())
    config_path = os.path.join(workdir, "config.json")
    if not changes and os.path.exists(config_path):
      with open(config_path) as f:
        changes = config_changes(computation_config(json.load(f)),
                                 computation_config(config_tree(config)))
    log(f"a new ledger segment starts at step {checkpoint_step}: the privacy plan, the "
        f"config or the platform changed ({', '.join(changes) or 'code or platform'}); "
        "its sampling and noise are fresh"
        + (f", and steps {checkpoint_step + 1}..{last.end}, released before, stay in the "
           "ledger." if resumed.abandoned() else "."))
  return Opening(run_secrets, header, resumed, plan)


def open_run(config, workdir: str, plan, checkpoint: tuple[int, dict] | None, *,
             force_resume: bool = False, force_restart: bool = False, log=print) -> Opening:
  """Decides how a run goes on in `workdir`, from its checkpoint and its ledger.

  Args:
    config: the run's config.
    workdir: the run directory (its privacy.json and metrics.jsonl are read).
    plan: the plan of `config` with nothing done (`plan.build_plan(config)`).
    checkpoint: (step, meta) of the newest intact checkpoint, or None.
    force_resume: go on under a changed privacy plan (a new segment composes both).
    force_restart: start over without a checkpoint, composing the ledger's earlier spending.
    log: where the one-line messages go.

  Returns:
    The opening. Raises ResumeError when going on would break the ledger.
  """
  on_disk = read(os.path.join(workdir, "privacy.json"))
  if checkpoint is None:
    return _fresh(config, workdir, plan, on_disk, force_restart, log)
  if force_restart:
    raise ResumeError(f"--force_restart: {workdir} has a checkpoint at step {checkpoint[0]}; "
                      "re-run without it to resume.")
  return _continued(config, workdir, plan, *checkpoint, on_disk, force_resume, log)
