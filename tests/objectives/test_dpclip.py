"""DP-CLIP end to end: the plan's sensitivities and noise, per-batch sensitivity on the real
model, training with each mechanism, zero-shot and retrieval metrics, config errors."""

import json
import math

import jax
import numpy as np
import pytest

from configs import evals
from dpvl import config as config_lib
from dpvl import train
from dpvl.data import sources
from dpvl.evaluate import checkpoint as eval_checkpoint
from dpvl.objectives import build_objective
from dpvl.privacy import contrastive
from dpvl.privacy import plan as plan_lib
from dpvl.privacy.sampling import Selection

GRADIENTS = dict(per_batch=contrastive.per_batch_gradient, logit_dp=contrastive.logit_dp_gradient)


def test_plans_declare_each_mechanisms_sensitivity_and_scale_the_noise(dpclip_config):
  plans = {m: plan_lib.build_plan(dpclip_config(m))
           for m in ("per_batch", "logit_dp")}
  pb, ld = plans["per_batch"], plans["logit_dp"]
  c = dpclip_config()
  assert pb.sensitivity == 2 * c.privacy.clip_norm and pb.noise_std == 2 * pb.noise_multiplier
  assert pb.groups == pb.num_microbatches == round(32 / 8)
  assert pb.microbatch_size % 8 == 0
  assert ld.sensitivity == pytest.approx(contrastive.logit_dp_sensitivity(
      c.privacy.clip_norm, c.model.temperature, ld.capacity))
  assert ld.noise_std == pytest.approx(ld.noise_multiplier * ld.sensitivity)
  # The accountant sees sigma = noise std / sensitivity: the same epsilon for every mechanism.
  per_example = plan_lib.build_plan(dpclip_config("per_example"))
  assert pb.epsilon(4) == pytest.approx(per_example.epsilon(4), rel=1e-6)
  assert pb.summary()["truncation_probability"] < 1e-3 * pb.delta


def _examples(objective, source, extra):
  """Prepared examples of every record of `source`, plus `extra` (an adversarial record)."""
  table = [objective.prepare(source[i]) for i in range(len(source))] + [extra]
  return {k: np.stack([t[k] for t in table]) for k in table[0]}


def _grouped(table, indices, key, step, groups, cap):
  sel = Selection(np.asarray(indices, np.int64), np.ones(len(indices), bool), len(indices), 0)
  sel = contrastive.hash_groups(sel, key, step, groups, cap)
  assert sel.truncated == 0
  batch = {k: v[sel.indices].reshape(groups, cap, *v.shape[1:]) for k, v in table.items()}
  return batch, sel.mask.reshape(groups, cap)


@pytest.fixture(scope="module")
def per_batch_setup(dpclip_config):
  """The small DP-CLIP model, 200 prepared records and a jitted clipped sum (noise off)."""
  config = dpclip_config()
  objective = build_objective(config)
  params = jax.jit(objective.init)(jax.random.key(0))
  source = sources.build_source(config.data)
  clip = 0.5
  run = jax.jit(lambda b, m: contrastive.per_batch_gradient(
      objective.dual_encoder, params, b, m, None, jax.random.key(0), clip_norm=clip,
      noise_std=0.0, expected_batch_size=1)[0])
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
  return objective, source, clip, lambda b, m: flat(run(b, m))


@pytest.mark.parametrize("adversary", ["random", "extreme", "duplicate_of_another"])
def test_per_batch_sensitivity_is_never_exceeded(per_batch_setup, adversary):
  objective, source, clip, clipped_sum = per_batch_setup
  rng = np.random.default_rng(0)
  n = 200
  extra = objective.prepare(source[n])
  if adversary == "extreme":
    extra["image"] = np.full_like(extra["image"], 50.0) * rng.choice([-1, 1], extra["image"].shape)
  elif adversary == "duplicate_of_another":  # every group sees a copy of some other pair
    extra = objective.prepare(source[3])
  table = _examples(objective, [source[i] for i in range(n)], extra)
  groups, cap = 4, 32
  worst = 0.0
  for step in range(4):
    chosen = rng.choice(n, size=40, replace=False)
    base = clipped_sum(*_grouped(table, chosen, 99, step, groups, cap))
    added = clipped_sum(*_grouped(table, np.append(chosen, n), 99, step, groups, cap))
    moved = np.linalg.norm(added - base)
    assert moved <= 2 * clip * (1 + 1e-5)
    worst = max(worst, moved / (2 * clip))
    replaced = chosen.copy()
    replaced[0] = n  # replace = remove chosen[0] + add k: at most two groups move, 4C
    swapped = clipped_sum(*_grouped(table, replaced, 99, step, groups, cap))
    assert np.linalg.norm(swapped - base) <= 4 * clip * (1 + 1e-5)
  print(f"per_batch {adversary}: worst measured / declared sensitivity = {worst:.3f}")
  assert worst > 0


@pytest.mark.parametrize("mechanism", ["per_batch", "logit_dp"])
def test_dpclip_trains_with_each_mechanism_and_reports_zero_shot_and_recall(tmp_path, mechanism,
                                                                            dpclip_config):
  config = dpclip_config(mechanism)
  config.evals = dict(
      zero_shot=evals.scene_zero_shot("colour", size=40, image_size=16),
      retrieval=evals.scene_retrieval(size=40, image_size=16))
  ledger = train.run(config, str(tmp_path), log=lambda *_: None)
  assert ledger["status"] == "completed" and ledger["steps_done"] == 4
  assert ledger["mechanism"] == mechanism
  assert ledger["noise_std"] == pytest.approx(ledger["noise_multiplier"] * ledger["sensitivity"])
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "epsilon" in r]
  assert train_rows and all(math.isfinite(r["private_data_diagnostics"]["loss"])
                            for r in train_rows)
  eval_rows = [r for r in rows if "zero_shot/top1" in r]
  assert [r["step"] for r in eval_rows] == [0, 4]
  for r in eval_rows:
    assert 0 <= r["zero_shot/top1"] <= 1 and r["zero_shot/chance"] == pytest.approx(1 / 7)
    assert {"retrieval/image_to_text_recall@1", "retrieval/text_to_image_recall@5"} <= set(r)
  # --mode=eval reproduces the row
  again = eval_checkpoint.evaluate_checkpoint(config, str(tmp_path))
  assert again["zero_shot/top1"] == pytest.approx(eval_rows[-1]["zero_shot/top1"])


def test_non_private_contrastive_baseline_runs(tmp_path, dpclip_config):
  config = dpclip_config("per_batch", enabled=False)
  ledger = train.run(config, str(tmp_path), log=lambda *_: None)
  assert ledger["private"] is False and ledger["status"] == "completed"


@pytest.mark.parametrize("objective_name,mechanism", [("dpclip", "per_example"),
                                                      ("dpcap", "logit_dp")])
def test_mechanism_must_fit_the_objective(tmp_path, objective_name, mechanism, dpcap_config,
                                          dpclip_config):
  config = (dpclip_config(mechanism) if objective_name == "dpclip"
            else dpcap_config(mechanism=mechanism))
  if objective_name == "dpcap":
    config.model.temperature = 0.5
  with pytest.raises(config_lib.ConfigError, match="mechanism"):
    train.run(config, str(tmp_path), log=lambda *_: None)


@pytest.mark.parametrize("mechanism", ["per_batch", "logit_dp"])
def test_paper_config_accounts_without_data_or_device(mechanism, cli):
  out = cli("--config=configs/dpclip_laion233m.py", "--mode=account",
            f"--config.privacy.mechanism={mechanism}", "--config.privacy.noise_multiplier=0.42",
            env=dict(JAX_PLATFORMS="tpu"))
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout)
  assert summary["mechanism"] == mechanism and summary["expected_batch_size"] == 32_768
  assert 7 < summary["epsilon_planned"] < 8
  assert summary["noise_std"] == pytest.approx(0.42 * summary["sensitivity"])
  if mechanism == "per_batch":
    assert summary["groups"] == 32 and summary["microbatch_size"] % 128 == 0


def test_paper_dual_encoder_builds_and_traces_at_full_size(bert_sized_vocab):
  from configs import dpclip_laion233m
  config = dpclip_laion233m.get_config()
  config.tokenizer.vocab_file = bert_sized_vocab
  objective = build_objective(config)
  shapes = jax.eval_shape(objective.init, jax.random.key(0))  # nothing is allocated
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert 85e6 < size(shapes["image"]["vit"]) < 87e6  # ViT-B/16
  assert shapes["image"]["proj"]["kernel"].shape == (768, 512)
  assert shapes["text"]["proj"]["kernel"].shape == (512, 512)
  assert shapes["text"]["pos_embedding"].shape == (77, 512)
  spec = objective.example_spec
  batch = {k: jax.ShapeDtypeStruct((2, 4, *s.shape), s.dtype) for k, s in spec.items()}
  mask = jax.ShapeDtypeStruct((2, 4), bool)
  for mechanism, how in (("per_batch", "exact"), ("logit_dp", "bound")):
    grad, metrics = jax.eval_shape(
        lambda p, b, m, mechanism=mechanism, how=how: GRADIENTS[mechanism](
            objective.dual_encoder, p, b, m, None, jax.random.key(0), clip_norm=1.0,
            noise_std=1.0, expected_batch_size=32_768, pair_norm_method=how),
        shapes, batch, mask)
    assert jax.tree.map(lambda g: g.shape, grad) == jax.tree.map(lambda s: s.shape, shapes)
    assert metrics["loss"].shape == ()
