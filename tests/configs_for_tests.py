"""Small configs built from the real demo configs: a few steps run in seconds.

Tests get these builders from the `dpcap_config` and `dpclip_config` fixtures (tests/conftest.py);
scripts that tests run in a subprocess import them from here.
"""

import ml_collections

from configs import dpcap_tiny
from configs import dpclip_tiny


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
  c.evals = ml_collections.ConfigDict()  # tests/evaluate/ covers the evaluators
  return c


def small_dpclip_config(mechanism="per_batch", **privacy):
  """The DP-CLIP demo config shrunk to run a few steps in seconds."""
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
