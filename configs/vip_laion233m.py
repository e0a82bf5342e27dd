"""ViP paper recipe (Yu et al., 2023): ViT-B/16 MAE, DP-SGD on 233M LAION images.

  python -m dpvl.main --config=configs/vip_laion233m.py --mode=account \\
      --config.privacy.noise_multiplier=0.48       # the paper's sigma: RDP epsilon 8.0

Expected batch 98,304, C = 0.1, 6,000 steps, target epsilon 8, delta = 1/(2N); AdamW
(0.9, 0.95), weight decay 0.005, lr = 1.5e-4 * B / 256, 1,000 warm-up steps, cosine; decoder
512 wide, 4 blocks, 16 heads; mask ratio 0.75. Start from a stage-1 synthetic run
(`config.init_from`).
"""

import ml_collections

from configs import common
from configs import evals
from configs import laion


def get_config():
  c = common.run("vip_mae", steps=6_000)
  # LAION converted to ArrayRecord (`python -m dpvl.data.convert`; docs/data.md): the images
  # are read, the captions are not used by ViP.
  c.data = laion.laion233m_data(crop="random_resized")

  c.model = ml_collections.ConfigDict(dict(
      dtype="bfloat16", mask_ratio=0.75, norm_pix_loss=True,
      encoder=laion.vit_b16(qkv_bias=True),
      decoder=dict(width=512, depth=4, num_heads=16, mlp_dim=2048)))

  c.batch = common.batch(expected_size=98_304, microbatch_size=4_096)
  c.mesh = common.mesh()
  c.privacy = common.privacy(
      clip_norm=0.1, delta=1 / (2 * laion.N),
      accountant="rdp")  # the paper's accountant; PLD gives 6.83 at sigma 0.48
  c.optimizer = common.optimizer(learning_rate=1.5e-4 * 98_304 / 256, warmup_steps=1_000)

  # ViP's probe reads the last 12 blocks, mean-pooled (on 32-pixel one-object scenes).
  c.evals = ml_collections.ConfigDict(dict(
      probe=evals.scene_probe("position_label", blocks=12, every=500),
      probe_last=evals.scene_probe("position_label", blocks=0, every=500),
      probe_shape=evals.scene_probe("label", blocks=12, every=500)))
  return c
