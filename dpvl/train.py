"""The training loop: Poisson batches -> private step -> metrics -> ledger -> checkpoint.

`run` reads top to bottom in sections: checks (everything a config or a path can get wrong,
before any compute), plan (the ledger so far decides the secrets, the segment and the plan),
state (restore or init), step, data, evals, loop, finish.

Workdir layout:
  config.json      the resolved config (without privacy.seed)
  privacy.json     the ledger: the plan, steps done, epsilon spent (rewritten as the run goes)
  metrics.jsonl    one JSON object per logged step, and one per evaluation (`config.evals`)
  tensorboard/     the same numbers as TensorBoard scalars
  checkpoints/     orbax: train state, the run's secrets, ledger
"""

import collections
import contextlib
import dataclasses
import functools
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpvl import checkpoint as checkpoint_lib
from dpvl import config as config_lib
from dpvl import evaluate
from dpvl import jsonfile
from dpvl import lock as lock_lib
from dpvl import metrics as metrics_lib
from dpvl import objectives
from dpvl import optim
from dpvl import stopping
from dpvl.data import errors as data_errors
from dpvl.data import loader as loader_lib
from dpvl.data import sources
from dpvl.data import stream as stream_lib
from dpvl.parallel import hosts
from dpvl.parallel import mesh as mesh_lib
from dpvl.privacy import ledger as ledger_lib
from dpvl.privacy import plan as plan_lib
from dpvl.privacy import provenance
from dpvl.privacy import sampling
from dpvl.privacy import secrets as secrets_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the checks produce: every setting of the run, checked, and what it was built from."""

  training: config_lib.Training
  optimizer: optim.Settings
  plan: plan_lib.PrivacyPlan
  objective: objectives.Objective
  source: object | None  # None when the run reads no data (--mode=compile)
  mesh: jax.sharding.Mesh
  gradient: Callable
  # The run's optimizer from the configured one (`dpvl.privacy.audit` trains its canaries'
  # parameters by plain SGD).
  wrap_optimizer: Callable[[optax.GradientTransformation], optax.GradientTransformation] = (
      lambda optimizer: optimizer)


def check_settings(config) -> tuple[config_lib.Training, optim.Settings]:
  """The checks that read the config only (no data, no device, no calibration).

  Returns:
    The loop's and the optimizer's settings; ConfigError naming the field otherwise. The names
    of the objective and the data source are checked too.
  """
  training = config_lib.training(config)
  optimizer = optim.settings(config)
  objectives.REGISTRY.lookup(config_lib.get_field(config, "objective"))
  sources.REGISTRY.lookup(config_lib.get_field(config, "data.source"), field="config.data.source")
  return training, optimizer


def check(config, workdir: str | None, devices=None) -> Setup:
  """Checks everything a config or a path can get wrong, cheapest first, before any compute.

  Args:
    config: the run's config.
    workdir: the run directory; None for a run without data (`--mode=compile`): then neither
      the workdir nor the data source is checked, and `Setup.source` is None.
    devices: the devices of the mesh; default `jax.devices()`.

  Returns:
    The checked setup; ConfigError with one sentence naming the field or path otherwise.
  """
  source = None
  if workdir is not None:
    _check_workdir(workdir)
  training, optimizer = check_settings(config)
  if workdir is not None:  # a wrong path or index, a bad model field fail here, before the
    source = sources.build_source(config.data)  # calibration of sigma
  objective = objectives.build_objective(config)
  plan = plan_lib.build_plan(config)
  config_lib.check(source is None or len(source) == plan.dataset_size,
                   f"config.data.size={plan.dataset_size} but the source holds "
                   f"{0 if source is None else len(source)} records.")
  gradient = plan.mechanism.gradient(objective)
  mesh = mesh_lib.make_mesh(config, devices)
  mesh_lib.check_microbatch_size(mesh, plan.microbatch_size)
  return Setup(training, optimizer, plan, objective, source, mesh, gradient)


def abstract_state(config, setup: Setup, optimizer: optax.GradientTransformation):
  """(init, abstract): the state's initialiser and its shapes, dtypes and shardings (from
  `config.mesh.rules`, `mesh_lib.state_shardings`), without computing it."""
  init = functools.partial(init_state, setup.objective, optimizer, setup.training.seed)
  shapes = jax.eval_shape(init)
  shardings = mesh_lib.state_shardings(shapes, setup.mesh, config)
  return init, jax.tree.map(
      lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, shardings)


def shardings_of(abstract):
  """The pytree of shardings of an abstract state (or of its params)."""
  return jax.tree.map(lambda s: s.sharding, abstract)


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


def _redacted(tree: dict) -> dict:
  """The config tree as config.json holds it: without `privacy.seed` (a secret)."""
  if tree.get("privacy", {}).get("seed") is not None:
    tree["privacy"]["seed"] = None
  return tree


def _duration(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def make_optimizer(setup: Setup) -> optax.GradientTransformation:
  """The run's optimizer: the configured one over the configured steps, holding the objective's
  frozen parameters still (`objectives.keep_frozen`), as `setup.wrap_optimizer` makes it."""
  optimizer = optim.make_optimizer(setup.optimizer, setup.plan.configured_steps)
  return setup.wrap_optimizer(objectives.keep_frozen(optimizer, setup.objective))


def init_state(objective, optimizer: optax.GradientTransformation, seed: int) -> dict:
  """The train state before the first step.

  Args:
    objective: the objective (its `init`).
    optimizer: the optax transformation (its `init`).
    seed: `config.seed`, public: parameter init needs no secret.

  Returns:
    dict(params, opt_state, step=0).
  """
  params = objective.init(jax.random.key(seed))
  return dict(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def make_train_step(gradient, optimizer, plan: plan_lib.PrivacyPlan, param_shardings=None):
  """The train step: private gradient, then the optimizer's update.

  Args:
    gradient: `plan.mechanism.gradient(objective)`.
    optimizer: the optax transformation.
    plan: the privacy plan (clip norm, noise std, expected batch size, enabled).
    param_shardings: the parameters' shardings (the noise is drawn shard by shard), or None.

  Returns:
    step(state, batch, mask, example_key, noise_key, loss_noise_key=None) -> (state, metrics),
    unjitted; batch and mask are [num_microbatches, microbatch_size, ...], `noise_key` is this
    step's own noise key (`secrets.RunSecrets.noise_key`), `example_key` the public key of
    per-example randomness (e.g. MAE masks), folded with the step, and `loss_noise_key` the
    step's key of the DP loss estimate (`secrets.RunSecrets.loss_noise_key`; only, and then
    needed, when the plan releases it: `step_keys`).
  """
  estimate = (dict(loss_bound=plan.loss_sensitivity, loss_noise_std=plan.loss_noise_std)
              if plan.loss_estimate else {})

  def step(state, batch, mask, example_key, noise_key, loss_noise_key=None):
    t = state["step"]
    rngs = jax.random.split(jax.random.fold_in(example_key, t), mask.shape)
    grad, metrics = gradient(
        state["params"], batch, mask, rngs, noise_key,
        clip_norm=plan.clip_norm, noise_std=plan.noise_std,
        expected_batch_size=plan.expected_batch_size, enabled=plan.enabled,
        shardings=param_shardings,
        **(dict(estimate, loss_noise_key=loss_noise_key) if estimate else {}))
    updates, opt_state = optimizer.update(grad, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, opt_state=opt_state, step=t + 1), metrics

  return step


def step_keys(run_secrets: secrets_lib.RunSecrets, plan: plan_lib.PrivacyPlan, segment: int,
              step: int) -> tuple:
  """The secret keys of `step` in segment `segment`, as the train step takes them: its noise
  key, and its loss noise key when the plan releases the DP loss estimate."""
  keys = (run_secrets.noise_key(segment, step),)
  if plan.loss_estimate:
    keys += (run_secrets.loss_noise_key(segment, step),)
  return keys


def select_and_load(sampler: sampling.PoissonSampler, plan: plan_lib.PrivacyPlan,
                    group_salt: int, loader: loader_lib.BatchLoader, step: int):
  """Step `step`'s selection, laid out by the plan's mechanism, and this host's share of it.

  Args:
    sampler: the segment's Poisson sampler.
    plan: the privacy plan (its mechanism arranges the selection into micro-batches).
    group_salt: the segment's secret salt of per-batch clipping's hash groups.
    loader: reads and prepares this host's slots.
    step: the global step.

  Returns:
    (selection, loader.Batch): the global selection and this host's prepared share.
  """
  selection = plan.mechanism.arrange(sampler.select(step), salt=group_salt, step=step,
                                     microbatch_size=plan.microbatch_size)
  return selection, loader.load(selection, step)


def save(ckpt: checkpoint_lib.Checkpointer, ledger: ledger_lib.Ledger, state,
         run_secrets: secrets_lib.RunSecrets, step: int, status: str,
         wait: bool = True) -> dict:
  """Writes the ledger up to `step`, then the checkpoint (unless `step` is saved already).

  The ledger goes first: it covers what the save releases. A checkpoint written in the
  background (`wait=False`) and lost in a crash only sends the resume back to the one before,
  with the ledger still counting every step released.

  Args:
    ckpt: the run's checkpointer.
    ledger: the run's ledger.
    state: the train state after `step` steps.
    run_secrets: the run's secrets, kept in the (private) checkpoint.
    step: the global step.
    status: the ledger status ("running", "completed", ...).
    wait: wait until the checkpoint is written; False returns once the state is copied to the
      host (the next save, or closing the checkpointer, waits for it).

  Returns:
    The ledger entry written.
  """
  ledger.advance(step)
  entry = ledger.write(status)
  if ckpt.latest_step() != step:
    ckpt.save(step, state, dict(secrets=run_secrets.hex(), ledger=entry), wait=wait)
  return entry


def run_evals(evaluators, params, step: int, last_step: int, writer: metrics_lib.MetricsWriter,
              log) -> None:
  """Runs the evaluators due at `step` on `params` and writes their row.

  Args:
    evaluators: the run's evaluators (`evaluate.build_evaluators`).
    params: the parameters (released: evaluation is post-processing); in a multi-process run
      they are gathered whole and evaluated on the primary process (call it on all).
    step: the global step the parameters are at.
    last_step: the run's last step (evaluators run at 0, every `every` steps, and at the end).
    writer: metrics.jsonl and TensorBoard; non-numeric outputs (e.g. sample captions) go to
      the workdir's evals/step_<step>.json (`evaluate.write_artifacts`).
    log: where the one-line summary goes.
  """
  due = [e for e in evaluators if evaluate.is_due(e, step, last_step)]
  if not due:
    return
  params = hosts.whole(params)  # every process takes part; the primary evaluates
  if not hosts.is_primary():
    return
  t = time.time()
  row = dict(step=step)
  for evaluator in due:
    row.update(evaluator(params))
  row, artifacts = evaluate.split_outputs(row)  # numbers to the metrics, the rest to evals/
  row["eval_seconds"] = round(time.time() - t, 3)
  writer.write(row)
  evaluate.write_artifacts(os.path.dirname(writer.path), step, artifacts)
  log(f"eval   {step:>6}/{last_step}  " + "  ".join(
      f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "eval_seconds")))


def metrics_row(step: int, step_metrics: list[dict], epsilon: float | None, *, seconds: float,
                data_wait: float, truncated: int, skipped: dict, replayed: bool,
                private_diagnostics: bool = True) -> dict:
  """The metrics.jsonl row of a logged step.

  `step`, `epsilon`, the timings, `replayed` and `dp_loss` (the DP loss estimate, when the plan
  releases it) are top-level; what is computed on the private data without noise is grouped
  under `private_data_diagnostics` (docs/privacy.md, "What a run releases").

  Args:
    step: the global step logged.
    step_metrics: host copies of the metrics of the steps since the last row (`loss` and
      `dp_loss` are their means, the other statistics the last step's).
    epsilon: the epsilon spent up to `step` (None when not private).
    seconds: seconds since the run started, across resumes.
    data_wait: seconds the loop waited for batches.
    truncated: records dropped from over-full batches so far.
    skipped: records skipped so far, by reason.
    replayed: whether `step` was released before a resume (the row is then marked).
    private_diagnostics: False leaves out `private_data_diagnostics`
      (`config.log_private_diagnostics`).

  Returns:
    The row.
  """
  last = step_metrics[-1]
  row = dict(step=step, epsilon=epsilon, seconds=round(seconds, 3),
             data_wait_seconds=round(data_wait, 3))
  if replayed:
    row["replayed"] = True  # its step was released before the resume
  if "dp_loss" in last:
    row["dp_loss"] = float(np.mean([m["dp_loss"] for m in step_metrics]))
  if private_diagnostics:
    row["private_data_diagnostics"] = dict(
        loss=float(np.mean([m["loss"] for m in step_metrics])), examples=int(last["examples"]),
        nonfinite=int(last["nonfinite"]),
        **{k: float(last[k]) for k in ("clipped_fraction", "grad_norm_mean") if k in last},
        truncated=truncated, skipped=dict(skipped))
  return row


def step_line(row: dict, total_steps: int, epsilon: float, per_step: float) -> str:
  """The console line of a metrics row: `dp_loss` and epsilon, and the private diagnostics'
  loss and batch size only when the row holds them."""
  diagnostics = row.get("private_data_diagnostics")
  parts = [f"step {row['step']:>6}/{total_steps}"]
  if diagnostics is not None:
    parts.append(f"loss {diagnostics['loss']:.4f}")
  if "dp_loss" in row:
    parts.append(f"dp_loss {row['dp_loss']:.4f}")
  parts.append(f"epsilon {epsilon:.4g}")
  if diagnostics is not None:
    parts.append(f"examples {diagnostics['examples']}")
  parts += [f"{row['seconds']:.1f}s", f"{per_step:.3g} s/step",
            f"ETA {_duration(per_step * (total_steps - row['step']))}"]
  return "  ".join(parts)


def final_status(final: int, plan: plan_lib.PrivacyPlan, signal_name: str | None, log) -> str:
  """The ledger status of a run that stopped after step `final`, said in one line.

  Args:
    final: the last step taken.
    plan: the privacy plan (its steps within budget and configured steps).
    signal_name: the signal that stopped the run early, if one did here (None also when
      another process's signal did).
    log: where the line goes.

  Returns:
    "interrupted", "budget_exhausted" or "completed".
  """
  if final < plan.steps:
    log(f"{signal_name or 'a stop request on another process'}: stopped after step {final} "
        "with a checkpoint; re-run the command to go on.")
    return "interrupted"
  if final < plan.configured_steps:
    log(f"privacy budget reached: stopping after {final} of {plan.configured_steps} steps; the "
        f"next step would exceed target epsilon {plan.target_epsilon}. Checkpoint saved.")
    return "budget_exhausted"
  return "completed"


def run(config, workdir: str, force_resume: bool = False, force_restart: bool = False,
        log=print, after_step: Callable[[int], None] | None = None, devices=None,
        instrument: Callable[[Setup], Setup] | None = None) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: the run's config.
    workdir: the run directory (created if needed; locked while the run holds it).
    force_resume: go on under a changed privacy plan (a new ledger segment composes both).
    force_restart: start over in a workdir whose ledger has spent steps but whose checkpoints
      are lost, with that spending composed into the new ledger.
    log: where the one-line progress and status messages go.
    after_step: called with the global step after each step's metrics and ledger are written,
      before its checkpoint (tests inject faults here).
    devices: the devices of the mesh (`config.mesh`); default `jax.devices()`.
    instrument: the checked setup -> the setup the run trains (`dpvl.privacy.audit` adds its
      canaries to the data, the objective and the optimizer); None trains the config as it is.

  Returns:
    The final ledger entry (as in privacy.json); a run stopped by a signal adds `stopped_by`
    (its name, or None for another process's).

  In a multi-process run every process calls `run`; the primary alone holds the lock, writes
  the workdir's files and logs (`dpvl.parallel.hosts`).
  """
  # --- Checks: nothing below can fail on a config or a path. --------------------------------
  setup = check(config, workdir, devices)
  if instrument is not None:
    setup = instrument(setup)
  evaluators = evaluate.build_evaluators(config, setup.objective)  # loads their data
  if not hosts.is_primary():
    log = lambda *_: None  # noqa: E731  # one process speaks
  os.makedirs(workdir, exist_ok=True)
  with (_hold(workdir, log), stopping.StopRequests(log) as stop,
        contextlib.closing(checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")))
        as ckpt):  # closing waits for a checkpoint still being written, whatever happens
    return _train(config, workdir, setup, evaluators, ckpt, force_resume, force_restart, stop,
                  log, after_step or (lambda step: None))


# Every step each process sends this many bytes to all others (`_agree_step`): enough for a
# stop flag and a count for each of the skip reasons of `dpvl.data.errors`.
STEP_MESSAGE_BYTES = 1024


@contextlib.contextmanager
def _hold(workdir: str, log):
  """The workdir's lock, held by the primary process for all the run's processes: if another
  run holds it, every process refuses with the same sentence."""
  lock = lock_lib.WorkdirLock(workdir, log)
  refused = None
  if hosts.is_primary():
    try:
      lock.acquire()
    except (lock_lib.LockedError, OSError) as e:
      refused = str(e)
  refused = hosts.broadcast_json(refused)
  if refused is not None:
    raise lock_lib.LockedError(refused)
  try:
    yield
  finally:
    lock.release()  # a no-op but on the holder


def _agreed(opening: ledger_lib.Opening) -> ledger_lib.Opening:
  """The opening with process 0's secrets and header on every process, once all processes are
  seen to have made the same decision (segment, start, plan) from the workdir."""
  if jax.process_count() == 1:
    return opening
  primary = hosts.broadcast_json(dict(secrets=opening.secrets.hex(), header=opening.header))
  decisions = hosts.gather_json([opening.resumed.segment_index, opening.resumed.start,
                                 opening.plan.fingerprint(), opening.complete is None])
  if any(d != decisions[0] for d in decisions):
    raise ledger_lib.ResumeError(
        "the processes of this run read the workdir's checkpoints and ledger differently "
        f"({decisions}); check that every host sees the same --workdir (a shared filesystem).")
  return dataclasses.replace(opening, header=primary["header"],
                             secrets=secrets_lib.RunSecrets.from_hex(primary["secrets"]))


def _agree_step(stop_requested: bool, skipped: collections.Counter):
  """(whether any process was asked to stop, the records all processes skipped by reason):
  the same on every process, so that all stop at the same step."""
  if jax.process_count() == 1:
    return stop_requested, skipped
  views = hosts.gather_json(dict(stop=stop_requested, skipped=dict(skipped)),
                           size=STEP_MESSAGE_BYTES)
  total = collections.Counter()
  for view in views:
    total.update(view["skipped"])
  return any(view["stop"] for view in views), total


def _holds_import(ckpt: checkpoint_lib.Checkpointer) -> bool:
  """Whether the oldest checkpoint was written by `dpvl.convert_checkpoint`, not by a run."""
  try:
    return "imported" in ckpt.restore_meta(min(ckpt.all_steps()))
  except Exception:  # pylint: disable=broad-except  # none, or unreadable: newest_intact's
    return False


def _train(config, workdir: str, setup: Setup, evaluators, ckpt: checkpoint_lib.Checkpointer,
           force_resume: bool, force_restart: bool, stop: stopping.StopRequests, log,
           after_step) -> dict:
  """`run` once its checks passed and it holds the workdir."""
  training, plan, objective = setup.training, setup.plan, setup.objective
  optimizer = make_optimizer(setup)
  init, abstract = abstract_state(config, setup, optimizer)
  shardings = shardings_of(abstract)

  # --- Plan: the checkpoint and the ledger decide the secrets, the segment and the plan. -----
  if _holds_import(ckpt):
    raise config_lib.ConfigError(
        f"{workdir} holds parameters imported by dpvl.convert_checkpoint, not a run to resume: "
        "evaluate them with --mode=eval, or train in another workdir.")
  restored = ckpt.newest_intact(abstract, os.path.join(workdir, "unrestorable_checkpoints"), log)
  opening = ledger_lib.open_run(
      config, workdir, plan, None if restored is None else (restored[0], restored[2]),
      force_resume=force_resume, force_restart=force_restart, log=log)
  opening = _agreed(opening)  # before the primary writes anything
  if opening.complete is not None:
    return opening.complete
  plan, header = opening.plan, dict(opening.header)
  if restored is None and training.init_from:  # checked before anything is written
    warm_params, header["init_from"] = provenance.load_warm_start(
        training.init_from, abstract["params"], config.data)
    log(f"parameters from {training.init_from} (stage 1: non-private, on public "
        f"{header['init_from']['data']['source']}); optimizer and ledger start fresh")
  if hosts.is_primary():
    jsonfile.write_atomic(os.path.join(workdir, "config.json"),
                          _redacted(ledger_lib.config_tree(config)))
  header["data"] = provenance.data_provenance(config.data)
  ledger = ledger_lib.Ledger(os.path.join(workdir, "privacy.json"), plan, opening.resumed,
                             ledger_lib.computation_fingerprint(config), header)

  # --- State: restored, or initialised (and warm-started). ---------------------------------
  if restored is None:
    state = jax.jit(init, out_shardings=shardings)()  # created sharded
    if "init_from" in header:
      state = dict(state, params=jax.device_put(warm_params, shardings["params"]))
    save(ckpt, ledger, state, opening.secrets, 0, "running")  # the secrets are fixed from here
  else:
    state = restored[1]
    log(f"resumed from step {int(state['step'])} in {workdir}")
  start = int(state["step"])

  # --- Step: the private step, jitted; its noise key is this segment's key of the step. ------
  train_step = jax.jit(make_train_step(setup.gradient, optimizer, plan, shardings["params"]),
                       donate_argnums=0)
  segment = opening.resumed.segment_index  # keys the segment's sampling, noise and groups
  example_key = jax.random.key(training.seed)
  batch_sharding = mesh_lib.batch_sharding(setup.mesh)

  # --- Data: the segment's Poisson sampler; each host loads its share, a step ahead. --------
  sampler = sampling.PoissonSampler(plan.dataset_size, plan.sampling_rate, plan.capacity,
                                    opening.secrets.sampler_seed(segment))
  block, blocks = mesh_lib.host_block(setup.mesh, plan.microbatch_size)
  loader = loader_lib.BatchLoader(setup.source, objective.prepare, objective.example_spec,
                                  plan.num_microbatches, plan.microbatch_size,
                                  processes=training.data_workers, host=block, num_hosts=blocks,
                                  augment=loader_lib.augmentation(config.data,
                                                                  objective.image_size))
  stream = stream_lib.BatchStream(
      functools.partial(select_and_load, sampler, plan, opening.secrets.group_salt(segment),
                        loader), start, plan.steps)
  skips = data_errors.SkipMonitor(training.log_every, training.max_skip_fraction)

  # --- Evals and metrics. -------------------------------------------------------------------
  writer = metrics_lib.MetricsWriter(workdir, enabled=hosts.is_primary())
  if plan.simulation:
    log(f"{plan_lib.SIMULATION_WARNING} Reference run: expected batch "
        f"{plan.simulation['reference_batch_size']}, sigma "
        f"{plan.simulation['reference_noise_multiplier']:.4g}, epsilon "
        f"{plan.simulation['reference_epsilon']} ({plan.simulation['reference_accountant']}).")
  log(f"{'TAN SIMULATION' if plan.simulation else 'private' if plan.enabled else 'NON-PRIVATE'} "
      f"run: N={plan.dataset_size} "
      f"q={plan.sampling_rate:.4g} sigma={plan.noise_multiplier:.4g} "
      + (f"sigma_loss={plan.loss_noise_multiplier:.4g} "
         f"loss_sensitivity={plan.loss_sensitivity:.4g} "
         f"sigma_eff={plan.effective_noise_multiplier:.4g} " if plan.loss_estimate else "")
      + f"C={plan.clip_norm} "
      f"mechanism={plan.mechanism.name} sensitivity={plan.sensitivity:.4g} "
      f"steps={plan.steps} capacity={plan.capacity} "
      f"({plan.num_microbatches}x{plan.microbatch_size}) target epsilon={plan.target_epsilon} "
      f"planned epsilon={ledger.summary['epsilon_planned']}")
  if plan.enabled and (report := plan.mechanism.report(objective, state["params"],
                                                          plan.microbatch_size)):
    log(report)
  if start == 0 < plan.steps:
    run_evals(evaluators, state["params"], 0, plan.steps, writer, log)  # the baseline
  released = metrics_lib.last_training_row(workdir)  # rows of steps after `start` are replayed
  t0 = time.time() - released.get("seconds", 0.0)  # `seconds` goes on across resumes
  t_start = time.time()
  truncated, step_metrics = 0, []

  # --- Loop. --------------------------------------------------------------------------------
  for step, (selection, batch) in stream:
    stop_now, skipped = _agree_step(stop.requested, batch.skipped)
    if stop_now:  # a signal during the step before: stop after it, on every process
      break
    truncated += selection.truncated
    skips.add(selection.size, skipped)
    bad_data = skips.too_many()
    if bad_data:  # before the step spends budget on it
      stream.close()
      loader.close()
      save(ckpt, ledger, state, opening.secrets, step, "stopped_bad_data")
      writer.close()
      raise data_errors.TooManyBadRecords(
          f"{bad_data}: stopped before step {step + 1} with a checkpoint; check the data "
          "(docs/data.md), then re-run the command to go on.")
    state, metrics = train_step(
        state, mesh_lib.global_batch(batch_sharding, batch.examples),
        mesh_lib.global_batch(batch_sharding, batch.mask), example_key,
        *step_keys(opening.secrets, plan, segment, step))
    step_metrics.append(metrics)
    done = step + 1
    ledger.advance(done)
    log_due = done % training.log_every == 0 or done == plan.steps
    evals_due = done < plan.steps and any(evaluate.is_due(e, done, plan.steps)
                                          for e in evaluators)
    if log_due or evals_due:
      entry = ledger.write("running")  # before anything of step `done` is released
    if log_due:
      row = metrics_row(done, jax.device_get(step_metrics), entry["epsilon_spent"],
                        seconds=time.time() - t0, data_wait=stream.wait_seconds,
                        truncated=truncated, skipped=skips.totals,
                        replayed=done <= released.get("step", 0),
                        private_diagnostics=training.log_private_diagnostics)
      step_metrics = []
      writer.write(row)
      per_step = (time.time() - t_start) / (done - start)
      log(step_line(row, plan.steps, ledger.epsilon(), per_step))
    after_step(done)
    if done % training.checkpoint_every == 0 and done != plan.steps:
      save(ckpt, ledger, state, opening.secrets, done, "running", wait=False)
    if evals_due:
      run_evals(evaluators, state["params"], done, plan.steps, writer, log)

  # --- Finish: the last checkpoint, the final evaluation, one line. ------------------------
  stream.close()
  loader.close()
  final = int(state["step"])
  status = final_status(final, plan, stop.signal_name, log)
  entry = save(ckpt, ledger, state, opening.secrets, final, status)
  if start < final and status != "interrupted":
    run_evals(evaluators, state["params"], final, plan.steps, writer, log)  # never costs work
  writer.close()
  if skips.totals and training.log_private_diagnostics:
    log(f"skipped records: {dict(skips.totals)}")
  log(f"done: {final} steps, epsilon {ledger.epsilon():.4g} at delta {plan.delta:.3g} "
      f"({plan.accountant}); ledger {ledger.path}")
  sys.stdout.flush()
  if status == "interrupted":
    entry = dict(entry, stopped_by=stop.signal_name)
  return entry
