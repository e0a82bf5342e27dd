"""ViP-MAE demo: a tiny masked autoencoder trained with DP-SGD on generated scenes (CPU).

  python -m dpvl.main --config=configs/vip_tiny.py --workdir=runs/vip_tiny

The private data are scenes of up to four shapes; the linear probes (before, during and after
training) read the encoder on separate one-object scenes and classify the object's position
(`probe`: last blocks pooled, ViP style; `probe_last`: last layer) and its shape
(`probe_shape`).
"""

import ml_collections

from configs import common
from configs import evals


def get_config():
  c = common.run("vip_mae", steps=250, checkpoint_every=50)
  c.data = common.scene_data(size=100_000, max_objects=4)

  c.model = ml_collections.ConfigDict(dict(
      dtype="float32", mask_ratio=0.75, norm_pix_loss=True,
      encoder=dict(patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128, qkv_bias=True,
                   posemb="sincos2d"),
      decoder=dict(width=64, depth=1, num_heads=4, mlp_dim=128)))

  c.batch = common.batch(expected_size=1_024, microbatch_size=128)
  c.mesh = common.mesh()
  c.privacy = common.privacy(clip_norm=0.1)
  c.optimizer = common.optimizer(learning_rate=5e-3, warmup_steps=25)

  depth = c.model.encoder.depth
  c.evals = ml_collections.ConfigDict(dict(
      probe=evals.scene_probe("position_label", blocks=depth, every=125),
      probe_last=evals.scene_probe("position_label", blocks=0, every=125),
      probe_shape=evals.scene_probe("label", blocks=depth, every=125)))
  return c
