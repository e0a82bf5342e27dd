"""ViP-MAE demo: a tiny masked autoencoder trained with DP-SGD on generated scenes (CPU)."""

import ml_collections

from configs import dpcap_tiny
from configs import evals


def get_config():
  c = dpcap_tiny.get_config()
  c.objective = "vip_mae"
  c.steps = 100
  del c["tokenizer"]
  c.model = ml_collections.ConfigDict(dict(
      dtype="float32", mask_ratio=0.75, norm_pix_loss=False,
      encoder=dict(patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128, qkv_bias=True,
                   posemb="sincos2d"),
      decoder=dict(width=64, depth=1, num_heads=4, mlp_dim=128)))
  c.privacy.clip_norm = 0.1
  c.optimizer.learning_rate = 2e-3
  # ViP's probe (last blocks pooled) and the plain last layer, before, during and after.
  c.evals = ml_collections.ConfigDict(dict(
      probe=evals.shape_probe(blocks=c.model.encoder.depth, every=50),
      probe_last=evals.shape_probe(blocks=0, every=50)))
  return c
