"""The training loop: Poisson batches -> private step -> metrics -> ledger -> checkpoint.

Workdir layout:
  config.json      the resolved config (without privacy.seed)
  privacy.json     the ledger: the plan, steps done, epsilon spent (rewritten as the run goes)
  metrics.jsonl    one JSON object per logged step, and one per evaluation (`config.evals`)
  tensorboard/     the same numbers as TensorBoard scalars
  checkpoints/     orbax: train state, the run's secrets, ledger
"""

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dpvl import config as config_lib
from dpvl import checkpoint as checkpoint_lib
from dpvl import evaluate
from dpvl import jsonfile
from dpvl import lock as lock_lib
from dpvl import metrics as metrics_lib
from dpvl import stopping
from dpvl.data import errors as data_errors
from dpvl.data import loader as loader_lib
from dpvl.data import sources
from dpvl.objectives import build_objective
from dpvl.privacy import contrastive
from dpvl.privacy import dpsgd
from dpvl.privacy import ledger as ledger_lib
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import provenance
from dpvl.privacy import sampling
from dpvl.privacy import secrets as secrets_lib


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
      raise config_lib.ConfigError(
          f"objective {objective.name!r} has a batch-coupled loss that per-example clipping "
          f"does not make private; set config.privacy.mechanism to one of "
          f"{contrastive.MECHANISMS}.")
    return functools.partial(dpsgd.private_gradient, objective.per_example_loss)
  if objective.dual_encoder is None:
    raise config_lib.ConfigError(
        f"config.privacy.mechanism={plan.mechanism!r} is for contrastive objectives; objective "
        f"{objective.name!r} has a per-example loss: use 'per_example'.")
  if pair_norms not in contrastive.PAIR_NORMS:
    raise config_lib.ConfigError(f"config.privacy.pair_norms={pair_norms!r} is unknown; choose "
                               f"one of {contrastive.PAIR_NORMS}.")
  return functools.partial(contrastive.GRADIENTS[plan.mechanism], objective.dual_encoder,
                           pair_norms_how=pair_norms)


def make_train_step(gradient, optimizer, plan: plan_lib.PrivacyPlan):
  """Returns step(state, batch, mask, example_key, noise_key) -> (state, metrics), unjitted.

  `gradient` is `gradient_fn(objective, plan)`; `noise_key` is this step's own noise key
  (`secrets.RunSecrets.noise_key`), `example_key` the public key of per-example randomness.
  """

  def step(state, batch, mask, example_key, noise_key):
    t = state["step"]
    rngs = jax.random.split(jax.random.fold_in(example_key, t), mask.shape)
    grad, metrics = gradient(
        state["params"], batch, mask, rngs, noise_key,
        clip_norm=plan.clip_norm, noise_std=plan.noise_std,
        expected_batch_size=plan.expected_batch_size, enabled=plan.enabled)
    updates, opt_state = optimizer.update(grad, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, opt_state=opt_state, step=t + 1), metrics

  return step


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Runs `config.evals` on the parameters of `workdir`'s checkpoint at `step` (default: the
  latest); appends the row (marked `"standalone": true`) to its metrics and returns it."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # and do not create it
    raise config_lib.ConfigError(f"{workdir} holds no checkpoint.")
  try:
    objective = build_objective(config)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  evaluators = evaluate.build_evaluators(config, objective)
  if not evaluators:
    raise config_lib.ConfigError("config.evals names no evaluator.")
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.all_steps():
    raise config_lib.ConfigError(f"{workdir} holds no checkpoint"
                               + ("" if step is None else f" at step {step}") + ".")
  params = ckpt.restore_state_arrays(step)["params"]
  ckpt.close()
  if not provenance.same_model(params, jax.eval_shape(objective.init, jax.random.key(0))):
    raise config_lib.ConfigError(f"the checkpoint in {workdir} holds another model than "
                               "config.model.")
  row = dict(step=step, standalone=True)
  for evaluator in evaluators:
    row.update(evaluator(params))
  writer = metrics_lib.MetricsWriter(workdir)
  writer.write(row)
  writer.close()
  return row


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def _restored_secrets(meta: dict, workdir: str) -> secrets_lib.RunSecrets:
  if "secrets" not in meta:
    raise ledger_lib.ResumeError(
        f"the checkpoint in {workdir} holds a seed from an earlier dpvl whose noise key kept "
        "only 32 bits of it; it cannot be resumed safely. Use a new --workdir.")
  return secrets_lib.RunSecrets.from_hex(meta["secrets"])


def _redacted(tree: dict) -> dict:
  """The config tree as config.json holds it: without `privacy.seed` (a secret)."""
  if tree.get("privacy", {}).get("seed") is not None:
    tree["privacy"]["seed"] = None
  return tree


def _check_workdir(workdir: str) -> None:
  """ConfigError unless `workdir` is, or can be made, a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file, not a directory.")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f"--workdir={workdir} cannot be written ({existing} is not "
                               "writable).")


def _last_training_row(workdir: str) -> dict:
  """The last training row of metrics.jsonl ({} if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return next((r for r in reversed(rows) if "loss" in r), {})


def _duration(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def _spent_without_checkpoint(workdir: str, on_disk: dict | None, force_restart: bool,
                              log) -> tuple[ledger_lib.Record, ...]:
  """The ledger records of a workdir without a checkpoint: () if it spent nothing. Its spending
  is never forgotten: a restart is refused unless `force_restart`, which composes it."""
  if on_disk is None:
    shown = _last_training_row(workdir).get("step", 0)
    if shown:
      raise ledger_lib.ResumeError(
          f"{workdir} has no checkpoint and no privacy.json, but its metrics.jsonl shows {shown} "
          "steps trained, whose spending cannot be accounted; restore the checkpoints or "
          "privacy.json, or use a new --workdir.")
    return ()
  spent = ledger_lib.accounted_steps(on_disk)
  if spent == 0:
    return ()
  if not force_restart:
    raise ledger_lib.ResumeError(
        f"{workdir} has no checkpoint to resume from, but its ledger (privacy.json) accounts "
        f"for {spent} steps (epsilon {on_disk.get('epsilon_spent')}) that starting over would "
        "forget; restore the checkpoints, use a new --workdir, or pass --force_restart to start "
        "over with that spending composed into the new ledger.")
  log(f"--force_restart: starting over; the {spent} steps in privacy.json (epsilon "
      f"{on_disk.get('epsilon_spent')}) stay in the ledger.")
  return tuple(ledger_lib.records_of(on_disk))


def run(config, workdir: str, force_resume: bool = False, force_restart: bool = False,
        log=print) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint. Returns the ledger.

  `force_resume`: go on under a changed privacy plan (a new ledger segment). `force_restart`:
  start over in a workdir whose ledger has spent steps but whose checkpoints are lost, with
  that spending composed into the new ledger.
  """
  _check_workdir(workdir)
  try:  # the data first: a wrong path or index fails here, before any slow step
    source = sources.build_source(config.data)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  plan = plan_lib.build_plan(config)
  try:
    objective = build_objective(config)
  except ValueError as e:  # bad model or tokenizer fields: one sentence, no traceback
    raise config_lib.ConfigError(str(e)) from None
  if len(source) != plan.dataset_size:
    raise config_lib.ConfigError(
        f"config.data.size={plan.dataset_size} but the source holds {len(source)} records.")
  gradient = gradient_fn(objective, plan, config_lib.get_field(config, "privacy.pair_norms",
                                                             "exact"))
  mesh = _mesh()
  if plan.microbatch_size % mesh.size:
    raise config_lib.ConfigError(
        f"config.batch.microbatch_size={plan.microbatch_size} must be divisible by the "
        f"{mesh.size} devices of the data axis.")
  evaluators = evaluate.build_evaluators(config, objective)  # loads their data: after the checks

  max_skip = float(config_lib.get_field(config, "data.max_skip_fraction", 0.05))
  if not 0 <= max_skip <= 1:
    raise config_lib.ConfigError(f"config.data.max_skip_fraction must be in [0, 1], got "
                               f"{max_skip}.")
  os.makedirs(workdir, exist_ok=True)
  with lock_lib.WorkdirLock(workdir, log), stopping.StopRequests(log) as stop:
    return _train(config, workdir, plan, objective, source, gradient, mesh, evaluators,
                  max_skip, force_resume, force_restart, stop, log)


def _train(config, workdir, plan, objective, source, gradient, mesh, evaluators, max_skip,
           force_resume, force_restart, stop, log) -> dict:
  """`run` once its cheap checks passed and it holds the workdir."""
  optimizer = make_optimizer(config.optimizer, plan.configured_steps)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, "data"))

  def init_state():
    params = objective.init(jax.random.key(config.seed))
    return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init_state)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          abstract)

  # The ledger so far, from the checkpoint and privacy.json; never from the config.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  ledger_path = os.path.join(workdir, "privacy.json")
  config_path = os.path.join(workdir, "config.json")
  computation = ledger_lib.computation_fingerprint(config)
  test_seed = config_lib.get_field(config, "privacy.seed", None)
  intact = ckpt.newest_intact(abstract, os.path.join(workdir, "unrestorable_checkpoints"), log)
  checkpoint_step = None if intact is None else intact[0]
  on_disk = ledger_lib.read(ledger_path)
  if checkpoint_step is None:
    earlier = _spent_without_checkpoint(workdir, on_disk, force_restart, log)
    if test_seed is None:
      run_secrets = secrets_lib.RunSecrets.draw()
    else:
      run_secrets = secrets_lib.RunSecrets.from_test_seed(test_seed)
      log("config.privacy.seed is set: whoever knows it can reproduce the sampling and the "
          "noise, so the run is private only against those who do not (for tests).")
    meta = dict(secrets=run_secrets.hex())
    header = dict(run_id=run_secrets.run_id,
                  secrets="os" if test_seed is None else "config.privacy.seed")
    resumed = ledger_lib.Resume(earlier, 0, 0)
    if earlier:
      header["earlier_runs"] = [on_disk.get("run_id"), *on_disk.get("earlier_runs", [])]
      plan = plan_lib.build_plan(config, [r.segment for r in earlier])
    init_from = config_lib.get_field(config, "init_from", None)
    if init_from:  # checked before anything is written
      warm_params, header["init_from"] = provenance.load_warm_start(
          init_from, abstract["params"], config.data)
      log(f"parameters from {init_from} (stage 1: non-private, on public "
          f"{header['init_from']['data']['source']}); optimizer and ledger start fresh")
  else:
    if force_restart:
      raise ledger_lib.ResumeError(f"--force_restart: {workdir} has a checkpoint at step "
                                   f"{checkpoint_step}; re-run without it to resume.")
    _, state, meta = intact
    run_secrets = _restored_secrets(meta, workdir)
    entry = ledger_lib.latest(meta["ledger"], on_disk)
    header = {k: entry[k] for k in ledger_lib.HEADER_FIELDS if k in entry}
    records = ledger_lib.records_of(entry)
    shown = _last_training_row(workdir).get("step", 0)
    if shown > records[-1].end:  # privacy.json lost or behind: the metrics show what was released
      log(f"metrics.jsonl shows step {shown}, after the ledger's step {records[-1].end}: the "
          "ledger counts up to it.")
      last = records[-1]
      records[-1] = dataclasses.replace(
          last, segment=last.segment.replace(steps=shown - last.start))
    if records[-1].plan == plan.fingerprint():
      went_on = plan_lib.build_plan(config, [r.segment for r in records[:-1]], records[-1].start)
      if checkpoint_step >= went_on.steps:
        spent = entry["epsilon_spent"]
        log(f"the run in {workdir} is complete ({entry['status']}, {entry['steps_done']} "
            f"steps, epsilon {'inf' if spent is None else f'{spent:.4g}'}); nothing to do.")
        ckpt.close()
        return entry
    if test_seed is not None and (secrets_lib.RunSecrets.from_test_seed(test_seed).run_id
                                  != run_secrets.run_id):
      log("config.privacy.seed differs from the seed this run started with; the run keeps "
          "its own secrets.")
    resumed = ledger_lib.resume(records, checkpoint_step, plan.fingerprint(), computation,
                                force_resume)
    plan = plan_lib.build_plan(config, [r.segment for r in resumed.closed], resumed.start)
    if len(resumed.closed) == len(records):  # a new segment
      last = records[-1]
      changes = ledger_lib.plan_changes(last.plan, plan.fingerprint())
      if not changes and os.path.exists(config_path):
        with open(config_path) as f:
          changes = ledger_lib.config_changes(ledger_lib.computation_config(json.load(f)),
                                              ledger_lib.computation_config(
                                                  ledger_lib.config_tree(config)))
      log(f"a new ledger segment starts at step {checkpoint_step}: the privacy plan, the "
          f"config or the platform changed ({', '.join(changes) or 'code or platform'}); "
          "its sampling and noise are fresh"
          + (f", and steps {checkpoint_step + 1}..{last.end}, released before, stay in the "
             "ledger." if resumed.abandoned() else "."))

  jsonfile.write_atomic(config_path, _redacted(ledger_lib.config_tree(config)))
  header["data"] = provenance.data_provenance(config.data)
  ledger = ledger_lib.Ledger(ledger_path, plan, resumed, computation, header)
  if checkpoint_step is None:
    state = jax.jit(init_state, out_shardings=replicated)()
    if "init_from" in header:
      state = dict(state, params=jax.device_put(warm_params, replicated))
    start = 0
  else:
    start = int(state["step"])
    log(f"resumed from step {start} in {workdir}")

  def save(step: int, status: str):
    ledger.advance(step)
    meta["ledger"] = ledger.write(status)  # the ledger first: it covers what the save releases
    if ckpt.latest_step() != step:
      ckpt.save(step, state, meta)

  if checkpoint_step is None:
    save(0, "running")  # the secrets are fixed from the first step on

  segment = resumed.segment_index  # keys the segment's sampling, noise and groups
  sampler = sampling.PoissonSampler(plan.dataset_size, plan.sampling_rate, plan.capacity,
                                    run_secrets.sampler_seed(segment))
  group_salt = run_secrets.group_salt(segment)
  example_key = jax.random.key(config.seed)
  loader = loader_lib.BatchLoader(source, objective.prepare, objective.example_spec,
                                  plan.num_microbatches, plan.microbatch_size,
                                  processes=config_lib.get_field(config, "data.workers", 0),
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
      f"planned epsilon={ledger.summary['epsilon_planned']}")

  def fetch(step):
    selection = sampler.select(step)
    if plan.mechanism == "per_batch":  # micro-batch g holds hash group g
      selection = contrastive.hash_groups(selection, group_salt, step,
                                          plan.num_microbatches, plan.microbatch_size)
    return selection, loader.load(selection)

  # Each host loads only its share (the columns its devices hold): assemble the global batch.
  to_global = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  prefetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  released = _last_training_row(workdir)  # rows of steps after `start` are replayed
  t0 = time.time() - released.get("seconds", 0.0)  # `seconds` goes on across resumes
  t_start = time.time()
  skipped_total, truncated_total, data_wait = {}, 0, 0.0
  pending = prefetcher.submit(fetch, start) if start < plan.steps else None
  if start == 0 < plan.steps:
    run_evals(0)  # the untrained (or warm-started) encoder: the baseline of every eval
  window = []
  recent = collections.deque(maxlen=config.log_every)  # (drawn, skipped) of the last batches
  for step in range(start, plan.steps):
    waited = time.time()
    selection, batch = pending.result()
    data_wait += time.time() - waited  # bounds the time the device idled for lack of data
    if step + 1 < plan.steps:
      pending = prefetcher.submit(fetch, step + 1)  # host prepares step+1 while device runs
    truncated_total += selection.truncated
    for reason, count in batch.skipped.items():
      skipped_total[reason] = skipped_total.get(reason, 0) + count
    recent.append((selection.size, batch.skipped))
    drawn, skipped = sum(d for d, _ in recent), sum(sum(c.values()) for _, c in recent)
    if data_errors.too_many_skipped(skipped, drawn, max_skip):  # before the step spends budget
      prefetcher.shutdown(wait=False, cancel_futures=True)
      loader.close()
      save(step, "stopped_bad_data")
      ckpt.close()
      writer.close()
      reasons = sum((c for _, c in recent), collections.Counter())
      raise data_errors.TooManyBadRecords(
          f"{skipped} of the {drawn} records drawn in the last {len(recent)} steps could not be "
          f"used ({dict(reasons)}), far more than config.data.max_skip_fraction={max_skip} "
          f"allows: stopped before step {step + 1} with a checkpoint; check the data "
          "(docs/data.md), then re-run the command to go on.")
    state, metrics = train_step(
        state, jax.tree.map(to_global, batch.examples), to_global(batch.mask), example_key,
        run_secrets.noise_key(segment, step))
    window.append(metrics)
    done = step + 1
    ledger.advance(done)
    log_due = done % config.log_every == 0 or done == plan.steps
    checkpoint_due = done % config.checkpoint_every == 0 and done != plan.steps
    evals_due = done < plan.steps and any(evaluate.is_due(e, done, plan.steps)
                                          for e in evaluators)
    if log_due or evals_due:
      entry = ledger.write("running")  # before anything of step `done` is released
    if log_due:
      window = jax.device_get(window)
      eps = ledger.epsilon()
      row = dict(step=done, loss=float(np.mean([m["loss"] for m in window])),
                 epsilon=entry["epsilon_spent"], examples=int(window[-1]["examples"]),
                 seconds=round(time.time() - t0, 3), data_wait_seconds=round(data_wait, 3),
                 truncated=truncated_total,
                 skipped=dict(skipped_total),
                 **{k: float(window[-1][k]) for k in ("clipped_fraction", "grad_norm_mean")
                    if k in window[-1]})
      if done <= released.get("step", 0):
        row["replayed"] = True  # its step was released before the resume
      window = []
      writer.write(row)
      per_step = (time.time() - t_start) / (done - start)
      log(f"step {done:>6}/{plan.steps}  loss {row['loss']:.4f}  epsilon {eps:.4g}  "
          f"examples {row['examples']}  {row['seconds']:.1f}s  {per_step:.3g} s/step  "
          f"ETA {_duration(per_step * (plan.steps - done))}")
    if checkpoint_due:
      save(done, "running")
    if evals_due:
      run_evals(done)
    if stop.requested and done < plan.steps:
      break

  prefetcher.shutdown(wait=False, cancel_futures=True)
  loader.close()
  final = int(state["step"])
  if final < plan.steps:
    status = "interrupted"
    log(f"{stop.signal_name}: stopped after step {final} with a checkpoint; re-run the command "
        "to go on.")
  elif final < plan.configured_steps:
    status = "budget_exhausted"
    log(f"privacy budget reached: stopping after {final} of {plan.configured_steps} steps; the "
        f"next step would exceed target epsilon {plan.target_epsilon}. Checkpoint saved.")
  else:
    status = "completed"
  save(final, status)
  ckpt.close()
  if start < final and status != "interrupted":
    run_evals(final)  # after the final checkpoint: an evaluation never costs training work
  writer.close()
  if skipped_total:
    log(f"skipped records: {skipped_total}")
  entry = meta["ledger"]
  log(f"done: {final} steps, epsilon {ledger.epsilon():.4g} at delta {plan.delta:.3g} "
      f"({plan.accountant}); ledger {ledger.path}")
  sys.stdout.flush()
  return entry
