"""The mechanism objects: each owns its layout, arrangement, gradient and sensitivity."""

import math
import types

import ml_collections
import numpy as np
import pytest

from dpvl import config as config_lib
from dpvl.privacy import contrastive
from dpvl.privacy import mechanism as mechanism_lib
from dpvl.privacy import sampling


def _config(**privacy):
  return ml_collections.ConfigDict(dict(
      batch=dict(slot_multiple=8), model=dict(temperature=0.5),
      privacy=dict(group_size=64, pair_norms="bound", **privacy)))


@pytest.mark.parametrize("name, kind", [("per_example", mechanism_lib.PerExample),
                                        ("per_batch", mechanism_lib.PerBatch),
                                        ("logit_dp", mechanism_lib.LogitDP)])
def test_the_config_names_the_mechanism(name, kind):
  mechanism = mechanism_lib.build_mechanism(_config(mechanism=name), expected_batch_size=1024)
  assert type(mechanism) is kind and mechanism.name == name


def test_an_unknown_mechanism_lists_the_choices():
  with pytest.raises(config_lib.ConfigError, match="privacy.mechanism.*logit_dp.*per_batch"):
    mechanism_lib.build_mechanism(_config(mechanism="per_sample"), expected_batch_size=1024)


@pytest.mark.parametrize("name", ["per_example", "per_batch"])
def test_the_clipping_strategy_is_read_and_checked(name):
  assert mechanism_lib.build_mechanism(_config(mechanism=name),
                                       expected_batch_size=1024).clipping == "vmap"
  built = mechanism_lib.build_mechanism(_config(mechanism=name, clipping="ghost"),
                                        expected_batch_size=1024)
  assert built.clipping == "ghost"
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.privacy.clipping='fast' is unknown; choose one of "
                           r"\['ghost', 'vmap'\]"):
    mechanism_lib.build_mechanism(_config(mechanism=name, clipping="fast"),
                                  expected_batch_size=1024)


def test_per_batch_hashes_into_groups_of_the_expected_size_and_lays_one_per_microbatch():
  mechanism = mechanism_lib.build_mechanism(_config(mechanism="per_batch"), 1024)
  assert mechanism.groups == 16
  num_micro, micro = mechanism.layout(capacity=1200, microbatch_size=64)
  assert (num_micro, micro) == (16, 80)  # 1200 // 16 = 75 slots per group, rounded up to 80
  rng = np.random.default_rng(0)
  indices = np.zeros(2048, np.int64)
  indices[:1000] = rng.choice(100_000, 1000, replace=False)
  selection = sampling.Selection(indices, np.arange(2048) < 1000, 1000, 0)
  arranged = mechanism.arrange(selection, salt=5, step=3, microbatch_size=micro)
  expected = contrastive.hash_groups(selection, 5, 3, 16, micro)
  np.testing.assert_array_equal(arranged.indices, expected.indices)
  np.testing.assert_array_equal(arranged.mask, expected.mask)
  groups = arranged.indices.reshape(16, micro)
  for g in range(16):  # micro-batch g holds exactly the records of hash group g
    held = groups[g][arranged.mask.reshape(16, micro)[g]]
    assert (contrastive.group_of(held, 5, 3, 16) == g).all()


def test_per_example_and_logit_dp_keep_the_selection_and_the_microbatch_size():
  selection = sampling.Selection(np.arange(8), np.ones(8, bool), 8, 0)
  for mechanism in (mechanism_lib.PerExample(), mechanism_lib.LogitDP(temperature=1.0)):
    assert mechanism.layout(capacity=100, microbatch_size=32) == (4, 32)
    assert mechanism.arrange(selection, salt=1, step=0, microbatch_size=32) is selection


def test_each_mechanism_declares_its_sensitivity():
  assert mechanism_lib.PerExample().sensitivity(1.5, capacity=512) == 1.5
  assert mechanism_lib.PerBatch(num_groups=4).sensitivity(1.5, capacity=512) == 3.0
  logit = mechanism_lib.LogitDP(temperature=0.5)
  small, large = logit.sensitivity(1.0, capacity=8), logit.sensitivity(1.0, capacity=10**6)
  # (C / tau)(2 + 2R) with R = (M-1) / (1 + (M-1) e^(-2/tau)): grows with M, saturates at e^(2/tau)
  assert small == pytest.approx(2.0 * (2 + 2 * 7 / (1 + 7 * math.exp(-4.0))))
  assert small < large <= 2.0 * (2 + 2 * math.exp(4.0))


def test_a_mechanism_refuses_an_objective_without_what_it_clips():
  per_example = types.SimpleNamespace(name="dpcap", per_example_loss=lambda p, x, r: 0.0)
  contrastive_objective = types.SimpleNamespace(name="dpclip", dual_encoder=object())
  with pytest.raises(config_lib.ConfigError, match="per-example clipping.*mechanism"):
    mechanism_lib.PerExample().gradient(contrastive_objective)
  for mechanism in (mechanism_lib.PerBatch(), mechanism_lib.LogitDP()):
    with pytest.raises(config_lib.ConfigError, match="mechanism.*'per_example'"):
      mechanism.gradient(per_example)
  assert callable(mechanism_lib.PerExample().gradient(per_example))
  assert callable(mechanism_lib.LogitDP().gradient(contrastive_objective))
