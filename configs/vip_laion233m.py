"""ViP paper recipe (Yu et al., 2023): ViT-B/16 MAE, DP-SGD on 233M LAION images.

  python -m dpvl.main --config=configs/vip_laion233m.py --mode=account \\
      --config.privacy.noise_multiplier=0.48       # the paper's sigma: RDP epsilon 8.0

Expected batch 98,304, C = 0.1, 6,000 steps, target epsilon 8, delta = 1/(2N); AdamW
(0.9, 0.95), weight decay 0.005, lr = 1.5e-4 * B / 256, 1,000 warm-up steps, cosine; decoder
512 wide, 4 blocks, 16 heads; mask ratio 0.75. Start from a stage-1 synthetic run
(`config.init_from`).
"""

import ml_collections

from configs import laion
from configs import vip_tiny

N = laion.N


def get_config():
  c = vip_tiny.get_config()
  c.steps = 6_000
  # LAION converted to ArrayRecord (`python -m dpvl.data.convert`; docs/data.md): the images
  # are read, the captions are not used by ViP.
  c.data = laion.laion233m_data(crop="random_resized")
  c.model = ml_collections.ConfigDict(dict(
      dtype="bfloat16", mask_ratio=0.75, norm_pix_loss=True,
      encoder=laion.vit_b16(qkv_bias=True),
      decoder=dict(width=512, depth=4, num_heads=16, mlp_dim=2048)))
  c.batch.expected_size = 98_304
  c.batch.microbatch_size = 4_096
  c.privacy.clip_norm = 0.1
  c.privacy.target_epsilon = 8.0
  c.privacy.delta = 1 / (2 * N)
  c.privacy.accountant = "rdp"  # the paper's accountant; PLD gives 6.83 at sigma 0.48
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1.5e-4 * 98_304 / 256, b1=0.9, b2=0.95, weight_decay=0.005,
      warmup_steps=1_000, schedule="cosine"))
  for name in c.evals:
    c.evals[name].every = 500
  c.evals.probe.blocks = c.evals.probe_shape.blocks = 12  # ViP: last 12 blocks, mean-pooled
  c.log_every = 10
  c.checkpoint_every = 100
  return c
