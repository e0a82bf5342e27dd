"""The training loop: Poisson batches -> private step -> metrics -> ledger -> checkpoint.

Workdir layout:
  config.json      the resolved config
  privacy.json     the ledger: the plan, steps done, epsilon spent (rewritten as the run goes)
  metrics.jsonl    one JSON object per logged step, and one per evaluation (`config.evals`)
  tensorboard/     the same numbers as TensorBoard scalars
  checkpoints/     orbax: train state, seeds, ledger
"""

import concurrent.futures
import functools
import json
import math
import os
import secrets
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dpvl import checkpoint as checkpoint_lib
from dpvl import evaluate
from dpvl import jsonfile
from dpvl import metrics as metrics_lib
from dpvl.data import loader as loader_lib
from dpvl.data import sources
from dpvl.objectives import build_objective
from dpvl.privacy import accounting
from dpvl.privacy import contrastive
from dpvl.privacy import dpsgd
from dpvl.privacy import noise
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import sampling


class ResumeError(RuntimeError):
  """A checkpoint exists whose privacy plan differs from the config's."""


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay; no weight decay on biases and norms."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=opt_cfg.warmup_steps,
      decay_steps=max(total_steps, opt_cfg.warmup_steps + 1), end_value=0.0)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                     weight_decay=opt_cfg.weight_decay, mask=decay_mask)


def gradient_fn(objective, plan: plan_lib.PrivacyPlan, pair_norms: str = "exact"):
  """The private gradient of the plan's mechanism for `objective`:
  (params, batch, mask, rngs, noise_key, *, clip_norm, noise_std, expected_batch_size, enabled)
  -> (gradient estimate, metrics). `pair_norms` is Logit-DP's speed/memory knob."""
  if plan.mechanism == "per_example":
    if objective.per_example_loss is None:
      raise plan_lib.ConfigError(
          f"objective {objective.name!r} has a batch-coupled loss that per-example clipping "
          f"does not make private; set config.privacy.mechanism to one of "
          f"{contrastive.MECHANISMS}.")
    return functools.partial(dpsgd.private_gradient, objective.per_example_loss)
  if objective.dual_encoder is None:
    raise plan_lib.ConfigError(
        f"config.privacy.mechanism={plan.mechanism!r} is for contrastive objectives; objective "
        f"{objective.name!r} has a per-example loss: use 'per_example'.")
  if pair_norms not in contrastive.PAIR_NORMS:
    raise plan_lib.ConfigError(f"config.privacy.pair_norms={pair_norms!r} is unknown; choose "
                               f"one of {contrastive.PAIR_NORMS}.")
  return functools.partial(contrastive.GRADIENTS[plan.mechanism], objective.dual_encoder,
                           pair_norms_how=pair_norms)


def make_train_step(gradient, optimizer, plan: plan_lib.PrivacyPlan):
  """Returns step(state, batch, mask, example_key, noise_key) -> (state, metrics), unjitted.

  `gradient` is `gradient_fn(objective, plan)`.
  """

  def step(state, batch, mask, example_key, noise_key):
    t = state["step"]
    rngs = jax.random.split(jax.random.fold_in(example_key, t), mask.shape)
    grad, metrics = gradient(
        state["params"], batch, mask, rngs, noise.step_key(noise_key, t),
        clip_norm=plan.clip_norm, noise_std=plan.noise_std,
        expected_batch_size=plan.expected_batch_size, enabled=plan.enabled)
    updates, opt_state = optimizer.update(grad, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, opt_state=opt_state, step=t + 1), metrics

  return step


def _segments_from_meta(meta: dict) -> list[accounting.Segment]:
  return [accounting.Segment(**s) for s in meta["ledger"]["segments"]]


class Ledger:
  """privacy.json: the plan, the steps done and the epsilon spent, always on disk."""

  def __init__(self, plan: plan_lib.PrivacyPlan, path: str):
    self.plan = plan
    self.path = path
    self.summary = plan.summary()

  def entry(self, step: int, status: str) -> dict:
    spent = {f"epsilon_spent_{a}": _none_if_inf(self.plan.epsilon(step, a))
             for a in accounting.ACCOUNTANTS}
    return dict(self.summary, steps_done=step, status=status,
                epsilon_spent=spent[f"epsilon_spent_{self.plan.accountant}"], **spent,
                segments=[s.__dict__ for s in self.plan.segments(step)],
                fingerprint=self.plan.fingerprint())

  def write(self, step: int, status: str) -> dict:
    entry = self.entry(step, status)
    jsonfile.write_atomic(self.path, entry)
    return entry


def load_warm_start(workdir: str, abstract_params):
  """Parameters of the run in `workdir` (latest checkpoint) for a warm start, and provenance.

  Only a non-private run may seed a private one without composing budgets: this run's ledger
  starts at zero, which is right only if stage 1 touched no private data (e.g. synthetic
  images). A stage 1 that spent privacy budget is refused; its provenance (data source, steps)
  is kept in this run's checkpoints.
  """
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is None:
    raise plan_lib.ConfigError(f"config.init_from={workdir!r} holds no checkpoint.")
  stage1 = ckpt.restore_meta()["ledger"]
  if stage1["private"] and stage1["steps_done"] > 0:
    raise plan_lib.ConfigError(
        f"config.init_from={workdir!r} was trained with DP for {stage1['steps_done']} steps "
        f"(epsilon {stage1['epsilon_spent']}); a warm start must come from a non-private run "
        "on public or synthetic data, or resume that run instead.")
  params = ckpt.restore_state_arrays()["params"]
  ckpt.close()
  if not _same_model(params, abstract_params):
    raise plan_lib.ConfigError(
        f"config.init_from={workdir!r} has parameters of another model than config.model.")
  with open(os.path.join(workdir, "config.json")) as f:
    source = json.load(f)["data"]["source"]
  return params, dict(path=os.path.abspath(workdir), data_source=source,
                      steps=stage1["steps_done"])


def _same_model(params, abstract_params) -> bool:
  """Whether restored `params` have the structure, shapes and dtypes of `abstract_params`."""
  describe = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
  return describe(params) == describe(abstract_params)


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Runs `config.evals` on the parameters of `workdir`'s checkpoint at `step` (default: the
  latest); appends the row (marked `"standalone": true`) to its metrics and returns it."""
  try:
    objective = build_objective(config)
  except ValueError as e:
    raise plan_lib.ConfigError(str(e)) from None
  evaluators = evaluate.build_evaluators(config, objective)
  if not evaluators:
    raise plan_lib.ConfigError("config.evals names no evaluator.")
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.all_steps():
    raise plan_lib.ConfigError(f"{workdir} holds no checkpoint"
                               + ("" if step is None else f" at step {step}") + ".")
  params = ckpt.restore_state_arrays(step)["params"]
  ckpt.close()
  if not _same_model(params, jax.eval_shape(objective.init, jax.random.key(0))):
    raise plan_lib.ConfigError(f"the checkpoint in {workdir} holds another model than "
                               "config.model.")
  row = dict(step=step, standalone=True)
  for evaluator in evaluators:
    row.update(evaluator(params))
  writer = metrics_lib.MetricsWriter(workdir)
  writer.write(row)
  writer.close()
  return row


def _none_if_inf(x: float):
  return x if math.isfinite(x) else None


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def run(config, workdir: str, force_resume: bool = False, log=print) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint. Returns the ledger."""
  plan = plan_lib.build_plan(config)
  try:
    objective = build_objective(config)
    source = sources.build_source(config.data)
  except ValueError as e:  # bad model, tokenizer or data fields: one sentence, no traceback
    raise plan_lib.ConfigError(str(e)) from None
  if len(source) != plan.dataset_size:
    raise plan_lib.ConfigError(
        f"config.data.size={plan.dataset_size} but the source holds {len(source)} records.")
  gradient = gradient_fn(objective, plan, plan_lib.get_field(config, "privacy.pair_norms",
                                                             "exact"))
  mesh = _mesh()
  if plan.microbatch_size % mesh.size:
    raise plan_lib.ConfigError(
        f"config.batch.microbatch_size={plan.microbatch_size} must be divisible by the "
        f"{mesh.size} devices of the data axis.")
  evaluators = evaluate.build_evaluators(config, objective)  # loads their data: after the checks

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  meta = ckpt.restore_meta() if ckpt.latest_step() is not None else None
  if meta is not None and meta["ledger"]["fingerprint"] != plan.fingerprint():
    old, new = meta["ledger"]["fingerprint"], plan.fingerprint()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not force_resume:
      raise ResumeError(
          f"the checkpoint in {workdir} was made under another privacy plan (changed: "
          f"{', '.join(f'{k} {old.get(k)} -> {new.get(k)}' for k in changed)}); resuming would "
          "break its ledger. Use a new --workdir, or --force_resume to compose both plans.")
    log(f"forced resume with a changed privacy plan ({', '.join(changed)}); the ledger "
        "composes the steps done under the old plan with the new ones.")
    plan = plan_lib.build_plan(config, done=_segments_from_meta(meta))

  jsonfile.write_atomic(os.path.join(workdir, "config.json"),
                        json.loads(config.to_json_best_effort()))
  ledger = Ledger(plan, os.path.join(workdir, "privacy.json"))
  optimizer = make_optimizer(config.optimizer, plan.configured_steps)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, "data"))

  def init_state():
    params = objective.init(jax.random.key(config.seed))
    return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init_state)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          abstract)
  if meta is None:
    state = jax.jit(init_state, out_shardings=replicated)()
    secret_seed = plan_lib.get_field(config, "privacy.seed", None)
    secret_seed = secrets.randbits(63) if secret_seed is None else int(secret_seed)
    meta = dict(secret_seed=secret_seed)
    init_from = plan_lib.get_field(config, "init_from", None)
    if init_from:
      params, meta["init_from"] = load_warm_start(init_from, abstract["params"])
      state = dict(state, params=jax.device_put(params, replicated))
      log(f"parameters from {init_from} (stage 1: {meta['init_from']['data_source']}, "
          "non-private); optimizer and ledger start fresh")
    start = 0
  else:
    state, meta = ckpt.restore(abstract)
    start = int(state["step"])
    log(f"resumed from step {start} in {workdir}")

  def save(step: int, status: str):
    meta["ledger"] = ledger.write(step, status)
    ckpt.save(step, state, meta)

  if start == 0 and ckpt.latest_step() is None:
    save(0, "running")  # the secret seed is fixed from the first step on

  sampler = sampling.PoissonSampler(plan.dataset_size, plan.sampling_rate, plan.capacity,
                                    meta["secret_seed"])
  noise_key = jax.random.key(meta["secret_seed"] ^ 0x6E6F697365)
  example_key = jax.random.key(config.seed)
  loader = loader_lib.BatchLoader(source, objective.prepare, objective.example_spec,
                                  plan.num_microbatches, plan.microbatch_size,
                                  processes=plan_lib.get_field(config, "data.workers", 0),
                                  host=jax.process_index(), num_hosts=jax.process_count())
  train_step = jax.jit(make_train_step(gradient, optimizer, plan), donate_argnums=0)

  writer = metrics_lib.MetricsWriter(workdir)

  def run_evals(step: int):
    due = [e for e in evaluators if evaluate.is_due(e, step, plan.steps)]
    if not due:
      return
    t = time.time()
    row = dict(step=step)
    for evaluator in due:
      row.update(evaluator(state["params"]))
    row["eval_seconds"] = round(time.time() - t, 3)
    writer.write(row)
    log(f"eval   {step:>6}/{plan.steps}  " + "  ".join(
        f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "eval_seconds")))

  log(f"{'private' if plan.enabled else 'NON-PRIVATE'} run: N={plan.dataset_size} "
      f"q={plan.sampling_rate:.4g} sigma={plan.noise_multiplier:.4g} C={plan.clip_norm} "
      f"mechanism={plan.mechanism} sensitivity={plan.sensitivity:.4g} "
      f"steps={plan.steps} capacity={plan.capacity} "
      f"({plan.num_microbatches}x{plan.microbatch_size}) target epsilon={plan.target_epsilon} "
      f"planned epsilon={ledger.summary['epsilon']}")
  def fetch(step):
    selection = sampler.select(step)
    if plan.mechanism == "per_batch":  # micro-batch g holds hash group g
      selection = contrastive.hash_groups(selection, meta["secret_seed"], step,
                                          plan.num_microbatches, plan.microbatch_size)
    return selection, loader.load(selection)

  # Each host loads only its share (the columns its devices hold): assemble the global batch.
  to_global = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  prefetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  t0 = time.time()
  skipped_total, truncated_total, data_wait = {}, 0, 0.0
  pending = prefetcher.submit(fetch, start) if start < plan.steps else None
  if start == 0 < plan.steps:
    run_evals(0)  # the untrained (or warm-started) encoder: the baseline of every eval
  window = []
  for step in range(start, plan.steps):
    waited = time.time()
    selection, batch = pending.result()
    data_wait += time.time() - waited  # bounds the time the device idled for lack of data
    if step + 1 < plan.steps:
      pending = prefetcher.submit(fetch, step + 1)  # host prepares step+1 while device runs
    truncated_total += selection.truncated
    for reason, count in batch.skipped.items():
      skipped_total[reason] = skipped_total.get(reason, 0) + count
    state, metrics = train_step(
        state, jax.tree.map(to_global, batch.examples), to_global(batch.mask), example_key,
        noise_key)
    window.append(metrics)
    done = step + 1
    if done % config.log_every == 0 or done == plan.steps:
      window = jax.device_get(window)
      eps = plan.epsilon(done)
      row = dict(step=done, loss=float(np.mean([m["loss"] for m in window])),
                 epsilon=_none_if_inf(eps), examples=int(window[-1]["examples"]),
                 seconds=round(time.time() - t0, 3), data_wait_seconds=round(data_wait, 3),
                 truncated=truncated_total,
                 skipped=dict(skipped_total),
                 **{k: float(window[-1][k]) for k in ("clipped_fraction", "grad_norm_mean")
                    if k in window[-1]})
      window = []
      writer.write(row)
      log(f"step {done:>6}/{plan.steps}  loss {row['loss']:.4f}  epsilon "
          f"{eps:.3f}  examples {row['examples']}  {row['seconds']:.1f}s")
    if done % config.checkpoint_every == 0 and done != plan.steps:
      save(done, "running")
    if done < plan.steps:
      run_evals(done)

  prefetcher.shutdown(wait=False)
  loader.close()
  final = int(state["step"])
  if final < plan.configured_steps:
    status = "budget_exhausted"
    log(f"privacy budget reached: stopping after {final} of {plan.configured_steps} steps; the "
        f"next step would exceed target epsilon {plan.target_epsilon}. Checkpoint saved.")
  else:
    status = "completed"
  save(final, status)
  ckpt.close()
  if start < final:
    run_evals(final)  # after the final checkpoint: an evaluation never costs training work
  writer.close()
  if skipped_total:
    log(f"skipped records: {skipped_total}")
  entry = meta["ledger"]
  log(f"done: {final} steps, epsilon {entry['epsilon_spent']} at delta {plan.delta:.3g} "
      f"({plan.accountant}); ledger {ledger.path}")
  sys.stdout.flush()
  return entry
