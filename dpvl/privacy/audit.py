"""Privacy audit in one training run (Steinke, Nasr and Jagielski, 2023).

`m` canaries take the last `m` records of the dataset; each is included with probability 1/2
(an excluded canary's record contributes nothing: the dataset without it). A shortened run of
the config trains on it through the whole engine: the Poisson sampler draws the canaries like
any record, the mechanism clips and noises them, the ledger accounts the run. After training,
every canary gets a score (higher: more likely included), and the scores of included and
excluded canaries give an epsilon lower bound at a stated confidence (jax_privacy's
`CanaryScoreAuditor.epsilon_one_run`). A correct mechanism keeps the bound below the claimed
epsilon (at the confidence's probability); a bound above it shows a broken one.

Canary kinds:
* "dirac" (white-box): canary j's loss has gradient `scale * e_j` on an extra parameter leaf,
  `audit_canaries` [m], that no data record touches; `scale` is far above the clip norm, so a
  private run clips it to C and a non-private one releases it whole. The leaf is updated by
  plain SGD (rate 1): its final value is minus the sum of the released noisy gradients, and
  minus that is the score.
* "input" (black-box): canary j is a record of uniform noise pixels with a caption of random
  letters (mislabelled and out of distribution); the score is its loss under the initial
  parameters minus its loss under the final ones.

The bound tests the claim at delta' = min(delta, 0.01 / m), whose epsilon the accountant gives
for the same run (a mechanism's guarantee is its whole privacy profile): at the configured
delta = 1/N a one-run audit with m ~ N / 4 canaries could show nothing, its delta term
(2 m delta) being near 1.

One run with `m` canaries cannot show more than about ln(m) (a perfect guess of every sampled
canary): `detectable_epsilon` reports that ceiling for the audit's settings, and the audit
picks its number of steps to maximise the ceiling's margin over the claimed epsilon.
"""

import dataclasses
import hashlib
import json
import math
import os
import secrets
import string

import jax
import jax.numpy as jnp
from jax_privacy import auditing
import ml_collections
import numpy as np
import optax

from dpvl import checkpoint as checkpoint_lib
from dpvl import config as config_lib
from dpvl import metrics as metrics_lib
from dpvl import objectives
from dpvl import train
from dpvl.parallel import hosts
from dpvl.privacy import accounting
from dpvl.privacy import ledger as ledger_lib
from dpvl.privacy import plan as plan_lib

KINDS = ("dirac", "input")
LEAF = "audit_canaries"  # the dirac canaries' parameter leaf
FIELD = "canary"         # a prepared example's canary field: one of the flags below, or j >= 0
REAL, EXCLUDED = -1, -2  # a record trained as it is; an excluded canary (contributes nothing)
SCALE = 1e3              # a dirac canary's raw gradient norm, in units of the clip norm
MAX_CANARIES = 1000
CONFIDENCE = 0.95
_STEP_CHOICES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclasses.dataclass(frozen=True)
class Canaries:
  """The audit's canaries: kind, which are included, and the seed they are drawn from."""

  kind: str
  included: np.ndarray  # bool [m]
  seed: int

  @property
  def count(self) -> int:
    return len(self.included)

  @classmethod
  def draw(cls, kind: str, count: int, seed: int) -> "Canaries":
    """`count` canaries of `kind`, each included with probability 1/2."""
    config_lib.check(kind in KINDS, f"--audit_kind={kind!r} is unknown; use one of {KINDS}.")
    included = np.random.default_rng([seed, 0]).random(count) < 0.5
    return cls(kind, included, seed)

  def record(self, j: int, template: dict) -> dict:
    """Canary j's record when included: a dirac canary's flag, or an input canary's noise
    image and random caption (its other fields as in `template`, a record of the dataset)."""
    if self.kind == "dirac":
      return {FIELD: j}
    rng = np.random.default_rng([self.seed, 1, j])
    image = np.asarray(template["image"])
    words = ["".join(rng.choice(list(string.ascii_lowercase), rng.integers(3, 8)))
             for _ in range(5)]
    return dict(template, image=rng.integers(0, 256, image.shape, dtype=np.uint8),
                caption=" ".join(words))


class CanarySource:
  """A data source with the canaries in its last `m` records (an excluded one's record
  contributes nothing)."""

  def __init__(self, base, canaries: Canaries):
    if canaries.count >= len(base):
      raise config_lib.ConfigError(f"--audit_canaries={canaries.count} must be fewer than the "
                                   f"dataset's {len(base)} records.")
    self._base, self._canaries = base, canaries
    self._first = len(base) - canaries.count

  def __len__(self) -> int:
    return len(self._base)

  def canary(self, j: int) -> dict:
    """Canary j's record as an included canary has it."""
    return self._canaries.record(j, self._base[j % self._first])

  def __getitem__(self, index: int) -> dict:
    j = int(index) - self._first
    if j < 0:
      return self._base[index]
    return self.canary(j) if self._canaries.included[j] else {FIELD: EXCLUDED}


def instrument_objective(objective: objectives.PerExampleObjective, canaries: Canaries,
                         clip_norm: float) -> objectives.PerExampleObjective:
  """`objective` with the canary field: excluded canaries have loss 0, a dirac canary j the
  loss `SCALE * clip_norm * x_j` (x: the `LEAF` parameters; value 0, gradient on x_j only)."""
  spec = dict(objective.example_spec, **{FIELD: jax.ShapeDtypeStruct((), jnp.int32)})
  blank = {name: np.zeros(s.shape, s.dtype) for name, s in objective.example_spec.items()}
  dirac = canaries.kind == "dirac"

  def init(rng):
    params = objective.init(rng)
    return dict(params, **{LEAF: jnp.zeros((canaries.count,), jnp.float32)}) if dirac else params

  def prepare(record):
    flag = record.get(FIELD, REAL)
    if flag != REAL:
      return dict(blank, **{FIELD: np.int32(flag)})
    return dict(objective.prepare(record), **{FIELD: np.int32(REAL)})

  def per_example_loss(params, example, rng):
    flag = example[FIELD]
    model_params = {k: v for k, v in params.items() if k != LEAF}
    example = {k: v for k, v in example.items() if k != FIELD}
    loss = jnp.where(flag == REAL, objective.per_example_loss(model_params, example, rng), 0.0)
    if dirac:
      x = params[LEAF][jnp.maximum(flag, 0)]
      loss = jnp.where(flag >= 0, SCALE * clip_norm * (x - jax.lax.stop_gradient(x)), loss)
    return loss

  return dataclasses.replace(objective, init=init, prepare=prepare, example_spec=spec,
                             per_example_loss=per_example_loss)


def _labelled(tree, label: str):
  return jax.tree.map(lambda _: label, tree)


def sgd_on_leaf(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` for the model, plain SGD at rate 1 (no decay) for the `LEAF` parameters."""
  labels = lambda params: {k: _labelled(v, "audit" if k == LEAF else "model")
                           for k, v in params.items()}
  return optax.multi_transform({"model": optimizer, "audit": optax.sgd(1.0)}, labels)


def instrument(setup: train.Setup, canaries: Canaries, clip_norm: float) -> train.Setup:
  """The run's setup with the canaries in its data, objective and (dirac) optimizer."""
  config_lib.check(isinstance(setup.objective, objectives.PerExampleObjective),
                   f"the audit needs a per-example loss; objective {setup.objective.name!r} "
                   f"(mechanism {setup.plan.mechanism.name!r}) has none.")
  objective = instrument_objective(setup.objective, canaries, clip_norm)
  return dataclasses.replace(
      setup, objective=objective, source=CanarySource(setup.source, canaries),
      gradient=setup.plan.mechanism.gradient(objective),
      wrap_optimizer=sgd_on_leaf if canaries.kind == "dirac" else setup.wrap_optimizer)


def epsilon_lower_bound(in_scores, out_scores, delta: float,
                        confidence: float = CONFIDENCE) -> float:
  """The one-run epsilon lower bound at `confidence` from the canaries' scores."""
  auditor = auditing.CanaryScoreAuditor(np.asarray(in_scores, np.float64),
                                        np.asarray(out_scores, np.float64))
  return float(auditor.epsilon_one_run(1.0 - confidence, delta))


def detectable_epsilon(count: int, sampling_rate: float, steps: int, delta: float,
                       confidence: float = CONFIDENCE) -> float:
  """The bound a perfect attack would show: every canary drawn at least once in `steps` steps
  (their expected number) is guessed right, and nothing else is guessed."""
  included = count // 2
  drawn = int(round(included * (1.0 - (1.0 - sampling_rate) ** steps)))
  if drawn == 0:
    return 0.0
  scores = np.zeros(included)
  scores[:drawn] = 1.0
  return epsilon_lower_bound(scores, np.zeros(count - included), delta, confidence)


def audit_delta(delta: float, count: int) -> float:
  """The delta the audit tests the claim at: min(delta, 0.01 / count)."""
  return min(delta, 0.01 / count)


def choose_steps(plan: plan_lib.PrivacyPlan, count: int,
                 confidence: float = CONFIDENCE) -> int:
  """The audit's steps (at most the config's): the largest margin of `detectable_epsilon`
  over the claimed epsilon of that many steps at the plan's noise multiplier."""
  delta = audit_delta(plan.delta, count)
  best, best_margin = None, -math.inf
  for steps in sorted({s for s in _STEP_CHOICES if s < plan.steps} | {plan.steps}):
    claimed = accounting.epsilon(plan.accountant, [plan.segment(steps)], delta)
    margin = detectable_epsilon(count, plan.sampling_rate, steps, delta,
                                confidence) - claimed
    if margin > best_margin:
      best, best_margin = steps, margin
  return best


def audit_config(config, steps: int, noise_multiplier: float | None):
  """The config of the audit's run: `steps` steps at the configured run's noise multiplier (the
  mechanism is the configured one; the claim is for the shorter run), no evaluations."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.steps = steps
  c.checkpoint_every = steps
  c.log_every = max(1, min(config_lib.get_field(config, "log_every", 10), steps))
  c.evals = ml_collections.ConfigDict()
  if noise_multiplier is not None:
    c.privacy.noise_multiplier = noise_multiplier
    c.privacy.target_epsilon = None
  return c


def _reference_plan(config) -> plan_lib.PrivacyPlan | None:
  """The configured run's private plan (also for a non-private config: what it would claim),
  or None when the config sets neither a noise multiplier nor a target epsilon."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.privacy.enabled = True
  try:
    return plan_lib.build_plan(c)
  except config_lib.ConfigError:
    return None


def _settings(directory: str, kind: str, count: int, steps: int,
              test_seed: int | None = None) -> int:
  """The canaries' seed: drawn once, kept in `directory`/canaries.json with the settings (a
  re-run goes on with them; other settings need another workdir). With `test_seed`
  (`config.privacy.seed`, which makes a run reproducible for tests) it is derived from it."""
  path = os.path.join(directory, "canaries.json")
  wanted = dict(kind=kind, count=count, steps=steps)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if {k: saved[k] for k in wanted} != wanted:
      raise config_lib.ConfigError(
          f"{directory} holds an audit with {({k: saved[k] for k in wanted})}, not {wanted}; "
          "remove it or audit another --workdir.")
    return int(saved["seed"])
  os.makedirs(directory, exist_ok=True)
  seed = (secrets.randbits(63) if test_seed is None else int.from_bytes(hashlib.sha256(
      f"dpvl/audit-canaries/{int(test_seed)}".encode()).digest()[:8], "big") >> 1)
  with open(path, "w") as f:
    json.dump(dict(wanted, seed=seed), f)
  return seed


def dirac_scores(final) -> np.ndarray:
  """float64 [m]: minus the `LEAF` parameters after training (the sum of the released noisy
  gradients on each canary's coordinate)."""
  return -np.asarray(final[LEAF], np.float64)


def input_scores(objective, initial, final, records, seed: int) -> np.ndarray:
  """float64 [m]: each canary record's loss before training minus its loss after.

  Args:
    objective: the run's objective before `instrument_objective`.
    initial, final: the parameters before and after training.
    records: the canaries' records as included canaries have them (`CanarySource.canary`).
    seed: the canaries' seed (keys the objective's per-example randomness, e.g. MAE masks).
  """
  examples = [objective.prepare(r) for r in records]
  batch = {k: jnp.stack([e[k] for e in examples]) for k in examples[0]}
  rngs = jax.random.split(jax.random.key(seed % 2**32), len(records))
  loss = jax.jit(jax.vmap(objective.per_example_loss, in_axes=(None, 0, 0)))
  return (np.asarray(loss(initial, batch, rngs), np.float64)
          - np.asarray(loss(final, batch, rngs), np.float64))


def verdict(result: dict) -> str:
  """One sentence on what the audit shows."""
  bound, claimed = result["empirical_epsilon_lower_bound"], result["claimed_epsilon"]
  if claimed is None:
    return f"not private: the run claims nothing, and leaks at least epsilon {bound:.3g}."
  if bound > claimed:
    return (f"refuted: the run leaks at least epsilon {bound:.3g}, more than the {claimed:.3g} "
            "it claims; the mechanism is broken.")
  if result["detectable_epsilon"] <= claimed:
    return (f"inconclusive: {result['canaries']} canaries in {result['steps']} steps can show "
            f"at most about {result['detectable_epsilon']:.3g}, not the claimed "
            f"{claimed:.3g}; use more canaries or a smaller epsilon.")
  return (f"consistent: lower bound {bound:.3g} <= claimed {claimed:.3g} (the audit could have "
          f"shown up to about {result['detectable_epsilon']:.3g}).")


def run(config, workdir: str, kind: str = "dirac", count: int | None = None,
        steps: int | None = None, confidence: float = CONFIDENCE, log=print) -> dict:
  """Audits `config`'s mechanism with one shortened run in `workdir`/audit.

  Args:
    config: the run's config (per-example objectives: dpcap, vip_mae).
    workdir: the audited run's directory; the audit's run goes to its `audit/` folder and the
      result is appended to its metrics.jsonl as `{"step", "audit": {...}}`.
    kind: "dirac" (white-box gradient canaries) or "input" (mislabelled records).
    count: canaries (default: min(1000, N // 4)).
    steps: the audit run's steps (default: `choose_steps`, at most `config.steps`).
    confidence: of the lower bound.
    log: where the run's lines go.

  Returns:
    The result: claimed_epsilon (None when not private), empirical_epsilon_lower_bound,
    canaries, confidence, canary_kind, detectable_epsilon, and the audit run's settings.
  """
  config_lib.check(kind in KINDS, f"--audit_kind={kind!r} is unknown; use one of {KINDS}.")
  train.check_settings(config)
  base_plan = plan_lib.build_plan(config)
  config_lib.check(base_plan.simulation is None, "config.tan: a TAN simulation has no "
                   "guarantee to audit; audit the reference run (config.tan.batch_size=0).")
  config_lib.check(base_plan.mechanism.name == "per_example",
                   f"the audit needs per-example clipping; config.privacy.mechanism="
                   f"{base_plan.mechanism.name!r} clips {base_plan.mechanism.takes}.")
  reference = base_plan if base_plan.enabled else _reference_plan(config)
  n = base_plan.dataset_size
  count = min(MAX_CANARIES, n // 4) if count is None else count
  config_lib.check(2 <= count < n, f"--audit_canaries={count} must be in [2, {n}).")
  if steps is None:
    steps = (choose_steps(reference, count, confidence) if reference is not None else
             min(base_plan.steps, math.ceil(1 / base_plan.sampling_rate)))
  config_lib.check(0 < steps, f"--audit_steps={steps} must be positive.")
  sigma = base_plan.noise_multiplier if base_plan.enabled else None
  config = audit_config(config, steps, sigma)
  directory = os.path.join(workdir, "audit")
  canaries = Canaries.draw(kind, count, _settings(
      directory, kind, count, steps, config_lib.get_field(config, "privacy.seed", None)))
  clip_norm = float(config_lib.get_field(config, "privacy.clip_norm"))
  log(f"audit: {count} {kind} canaries ({int(canaries.included.sum())} included), "
      f"{steps} steps at sigma {sigma if sigma is not None else 0:.4g} in {directory}")
  entry = train.run(config, directory, log=log,
                    instrument=lambda s: instrument(s, canaries, clip_norm))
  if entry["status"] != "completed":
    raise config_lib.ConfigError(f"the audit's run stopped ({entry['status']}); re-run the "
                                 "command to go on.")
  result = _result(config, directory, canaries, entry, confidence)
  writer = metrics_lib.MetricsWriter(workdir, enabled=hosts.is_primary())
  writer.write(dict(step=metrics_lib.last_training_row(workdir).get("step", 0), audit=result))
  writer.close()
  return result


def _result(config, directory: str, canaries: Canaries, entry: dict,
            confidence: float) -> dict:
  """The audit's result from its finished run in `directory` (ledger `entry`)."""
  setup = train.check(config, directory)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(directory, "checkpoints"))
  final = ckpt.restore_state_arrays(ckpt.latest_step())["params"]
  ckpt.close()
  if canaries.kind == "dirac":
    s = dirac_scores(final)
  else:
    initial = jax.jit(setup.objective.init)(jax.random.key(config_lib.training(config).seed))
    source = CanarySource(setup.source, canaries)
    s = input_scores(setup.objective, initial, final,
                     [source.canary(j) for j in range(canaries.count)], canaries.seed)
  plan, delta = setup.plan, audit_delta(setup.plan.delta, canaries.count)
  segments = [r.segment for r in ledger_lib.records_of(entry)]  # what the ledger accounts
  claimed = (accounting.finite_or_none(accounting.epsilon(plan.accountant, segments, delta))
             if plan.enabled else None)
  result = dict(
      claimed_epsilon=claimed,
      empirical_epsilon_lower_bound=epsilon_lower_bound(
          s[canaries.included], s[~canaries.included], delta, confidence),
      canaries=canaries.count, confidence=confidence, canary_kind=canaries.kind,
      detectable_epsilon=detectable_epsilon(canaries.count, plan.sampling_rate,
                                            entry["steps_done"], delta, confidence),
      delta=delta, included=int(canaries.included.sum()), steps=entry["steps_done"],
      private=plan.enabled, noise_multiplier=plan.noise_multiplier,
      effective_noise_multiplier=plan.effective_noise_multiplier if plan.enabled else 0.0,
      sampling_rate=plan.sampling_rate, claimed_epsilon_at_run_delta=entry.get("epsilon_spent"),
      run_delta=plan.delta, audit_workdir=directory)
  return dict(result, verdict=verdict(result))
