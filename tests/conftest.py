"""Shared test fixtures: small configs built from the real demo config."""

import os
import sys

import jax
import ml_collections
import pytest

# Tests build many identical train steps: share their compilations through JAX's persistent
# cache (a fresh directory per test session).
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dpvl-jax-cache-{os.getpid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import dpcap_tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


def small_dpcap_config(**privacy):
  """The demo config shrunk to run a few steps in seconds."""
  c = dpcap_tiny.get_config()
  c.steps = 6
  c.data.size = 2_000
  c.data.image_size = 16
  c.tokenizer.max_len = 48
  c.model.encoder.update(dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.decoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.batch.expected_size = 32
  c.batch.microbatch_size = 16
  c.privacy.noise_multiplier = 1.0
  c.privacy.target_epsilon = None
  c.privacy.seed = 1234
  c.privacy.update(privacy)
  c.optimizer.warmup_steps = 2
  c.log_every = 2
  c.checkpoint_every = 3
  c.evals = ml_collections.ConfigDict()  # tests/test_evals.py covers the evaluators
  return c


@pytest.fixture
def bert_sized_vocab(tmp_path) -> str:
  """Path of a word-piece vocab.txt with the public BERT vocabulary's size (30,522)."""
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                             [f"w{i}" for i in range(30_522 - 4)]) + "\n")
  return str(vocab)


@pytest.fixture
def small_config():
  return small_dpcap_config()


def small_dpclip_config(mechanism="per_batch", **privacy):
  """The DP-CLIP demo config shrunk to run a few steps in seconds."""
  from configs import dpclip_tiny  # pylint: disable=g-import-not-at-top
  c = dpclip_tiny.get_config()
  c.steps = 4
  c.data.size = 1_000
  c.data.image_size = 16
  c.tokenizer.max_len = 32
  c.model.encoder.update(dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.text.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.embed_dim = 8
  c.batch.expected_size = 32
  c.batch.microbatch_size = 16
  c.privacy.mechanism = mechanism
  c.privacy.group_size = 8
  c.privacy.noise_multiplier = 1.0
  c.privacy.target_epsilon = None
  c.privacy.seed = 1234
  c.privacy.update(privacy)
  c.optimizer.warmup_steps = 1
  c.log_every = 2
  c.checkpoint_every = 2
  c.evals = ml_collections.ConfigDict()
  return c
