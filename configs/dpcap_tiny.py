"""DP-Cap demo: a tiny captioner trained with DP-SGD on generated shape scenes (CPU, minutes).

  python -m dpvl.main --config=configs/dpcap_tiny.py --workdir=runs/dpcap_tiny
"""

import ml_collections

from configs import common
from configs import evals


def get_config():
  c = common.run("dpcap", steps=150, checkpoint_every=50)
  c.data = common.scene_data(size=20_000)
  c.tokenizer = common.byte_tokenizer(max_len=48)

  c.model = ml_collections.ConfigDict(dict(
      dtype="float32",
      encoder=dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, qkv_bias=True,
                   posemb="sincos2d"),
      decoder=dict(width=64, depth=2, num_heads=4, mlp_dim=128)))

  c.batch = common.batch(expected_size=256, microbatch_size=64)
  c.mesh = common.mesh()
  c.privacy = common.privacy()
  c.optimizer = common.optimizer(learning_rate=2e-3, warmup_steps=15)

  # Linear probe on the encoder before and after training (shape of one-object scenes).
  c.evals = ml_collections.ConfigDict(dict(
      probe=evals.scene_probe("label", blocks=c.model.encoder.depth)))
  return c
