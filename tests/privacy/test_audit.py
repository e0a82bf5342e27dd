"""The one-run privacy audit (dpvl/privacy/audit.py): its canaries, its statistics, and audits of
the demo model that pass with the configured noise and catch a non-private and an under-noised
run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpvl import config as config_lib
from dpvl import objectives
from dpvl.data import shape_scenes
from dpvl.privacy import accounting
from dpvl.privacy import audit
from dpvl.privacy import noise

# The demo model shrunk (tests/configs_for_tests.py) on the command line: 2,000 records, 6 steps.
SMALL_DEMO = ["--config.steps=6", "--config.data.size=2000", "--config.data.image_size=16",
              "--config.model.encoder.width=32", "--config.model.encoder.depth=1",
              "--config.model.encoder.num_heads=2", "--config.model.encoder.mlp_dim=64",
              "--config.model.decoder.width=32", "--config.model.decoder.depth=1",
              "--config.model.decoder.num_heads=2", "--config.model.decoder.mlp_dim=64",
              "--config.batch.expected_size=32", "--config.batch.microbatch_size=16",
              "--config.privacy.noise_multiplier=1.0", "--config.privacy.seed=1234",
              "--config.optimizer.warmup_steps=2", "--config.log_every=2"]


@pytest.fixture(scope="module")
def private_audit(tmp_path_factory):
  """The dirac audit of the small demo config at its configured noise (sigma 1)."""
  from tests.configs_for_tests import small_dpcap_config  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("audited")
  return audit.run(small_dpcap_config(), str(workdir), log=lambda *_: None), workdir


def test_canaries_take_the_last_records_and_excluded_ones_are_blank():
  base = shape_scenes.ShapeScenes(num_records=20, image_size=8, seed=0)
  canaries = audit.Canaries.draw("input", 6, seed=3)
  source = audit.CanarySource(base, canaries)
  assert len(source) == 20
  assert source[0]["caption"] == base[0]["caption"]  # the data, untouched
  for j in range(6):
    record = source[14 + j]
    if canaries.included[j]:
      assert record["image"].shape == (8, 8, 3) and record["caption"] != base[j]["caption"]
    else:
      assert record == {audit.FIELD: audit.EXCLUDED}
  assert 0 < canaries.included.sum() < 6
  with pytest.raises(Exception, match="must be fewer"):
    audit.CanarySource(base, audit.Canaries.draw("dirac", 20, seed=0))


def test_a_contrastive_mechanism_is_refused_before_anything_runs(dpclip_config, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="needs per-example clipping"):
    audit.run(dpclip_config(), str(tmp_path))
  assert not list(tmp_path.iterdir())


def _objective():
  """A per-example least-squares objective on one Dense layer."""
  w = jnp.arange(6.0).reshape(3, 2) / 10

  def loss(params, example, rng):
    del rng
    return jnp.sum((example["x"] @ params["dense"]["kernel"] - example["y"]) ** 2)

  return objectives.PerExampleObjective(
      name="toy", init=lambda rng: {"dense": {"kernel": w}}, per_example_loss=loss,
      prepare=lambda r: dict(x=np.asarray(r["x"], np.float32), y=np.asarray(r["y"], np.float32)),
      example_spec=dict(x=jax.ShapeDtypeStruct((3,), jnp.float32),
                        y=jax.ShapeDtypeStruct((2,), jnp.float32)))


def test_a_dirac_canary_has_a_gradient_on_its_own_coordinate_only():
  base = _objective()
  canaries = audit.Canaries(kind="dirac", included=np.array([True, False, True]), seed=0)
  objective = audit.instrument_objective(base, canaries, clip_norm=0.5)
  params = objective.init(None)
  grad = lambda record: jax.grad(objective.per_example_loss)(
      params, objective.prepare(record), None)
  real = dict(x=[1.0, 2.0, 3.0], y=[0.5, -1.0])
  g = grad(real)  # a record of the data: the objective's own gradient, none on the leaf
  expected = jax.grad(base.per_example_loss)(base.init(None), base.prepare(real), None)
  np.testing.assert_allclose(g["dense"]["kernel"], expected["dense"]["kernel"])
  assert not np.any(g[audit.LEAF])
  g = grad({audit.FIELD: 2})  # canary 2: scale * C on coordinate 2, nothing else
  np.testing.assert_array_equal(g[audit.LEAF], [0.0, 0.0, audit.SCALE * 0.5])
  assert not np.any(g["dense"]["kernel"])
  g = grad({audit.FIELD: audit.EXCLUDED})  # an excluded canary: no gradient at all
  assert not any(np.any(leaf) for leaf in jax.tree.leaves(g))
  assert float(objective.per_example_loss(params, objective.prepare({audit.FIELD: 2}),
                                          None)) == 0.0


def test_the_canaries_leaf_follows_the_released_gradient():
  tx = audit.sgd_on_leaf(optax.adamw(0.1, weight_decay=0.5))
  params = {"dense": {"kernel": jnp.ones((2, 2))}, audit.LEAF: jnp.zeros(3)}
  grads = {"dense": {"kernel": jnp.full((2, 2), 0.3)}, audit.LEAF: jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params[audit.LEAF], [-3.0, 6.0, -1.5])  # minus the sum
  assert not np.allclose(params["dense"]["kernel"], 1.0 - 3 * 0.3)  # AdamW, not SGD


def test_the_bound_is_zero_for_indistinguishable_scores_and_ln_m_at_most():
  rng = np.random.default_rng(0)
  same = audit.epsilon_lower_bound(rng.normal(size=500), rng.normal(size=500), 1e-5)
  assert same < 0.2
  perfect = audit.epsilon_lower_bound(np.ones(500), np.zeros(500), 1e-5)
  assert 3.0 < perfect < np.log(500)
  assert audit.detectable_epsilon(1000, 1.0, 1, 1e-5) == pytest.approx(perfect)
  assert audit.detectable_epsilon(1000, 0.01, 10, 1e-5) < perfect  # a tenth drawn


def test_private_audit_stays_below_its_claim(private_audit):
  result, workdir = private_audit
  assert result["canary_kind"] == "dirac" and result["private"]
  assert result["canaries"] == 500 and result["confidence"] == 0.95
  assert result["delta"] == pytest.approx(0.01 / 500)  # < 1/N: a testable claim
  # The claim is the accountant's epsilon of the audit's 6 steps at sigma 1, at that delta.
  ledger = json.loads((workdir / "audit" / "privacy.json").read_text())
  segment = accounting.Segment(2000, 0.016, 1.0, 6, capacity=ledger["capacity"])
  assert result["claimed_epsilon"] == pytest.approx(
      accounting.epsilon("pld", [segment], result["delta"]), rel=1e-6)
  # The audit had the power to refute the claim, and did not.
  assert result["detectable_epsilon"] > 2 * result["claimed_epsilon"]
  assert result["empirical_epsilon_lower_bound"] < result["claimed_epsilon"]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert rows[-1]["audit"] == result


def test_non_private_run_is_caught_from_the_command_line(private_audit, cli, tmp_path):
  out = cli("--config=configs/dpcap_tiny.py", f"--workdir={tmp_path}", "--mode=audit",
            "--config.privacy.enabled=false", *SMALL_DEMO)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])  # one JSON object, last
  assert result["claimed_epsilon"] is None and not result["private"]
  claimed = private_audit[0]["claimed_epsilon"]  # what the private run claims
  assert result["empirical_epsilon_lower_bound"] > 2 * claimed


def test_under_noised_run_is_caught(monkeypatch, dpcap_config, tmp_path):
  # The engine adds a tenth of the noise while the ledger claims sigma.
  add = noise.add_gaussian_noise
  monkeypatch.setattr(noise, "add_gaussian_noise",
                      lambda total, key, std, shardings=None: add(total, key, std / 10,
                                                                  shardings))
  result = audit.run(dpcap_config(), str(tmp_path), log=lambda *_: None)
  assert result["private"] and result["noise_multiplier"] == 1.0
  assert result["empirical_epsilon_lower_bound"] > 2 * result["claimed_epsilon"]
