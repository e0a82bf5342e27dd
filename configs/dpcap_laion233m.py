"""DP-Cap paper recipe (Sander et al., 2024): ViT-B/16 captioner, DP-SGD on 233M LAION pairs.

  python -m dpvl.main --config=configs/dpcap_laion233m.py --mode=account
  python -m dpvl.main --config=configs/dpcap_laion233m.py --mode=account \\
      --config.privacy.noise_multiplier=0.728      # the paper's sigma: RDP 8.07, PLD 7.36

Expected batch 1,310,720, C = 1, 5,708 steps, target epsilon 8 at delta = 1/N; AdamW
(0.9, 0.95), weight decay 0.005, lr 5.12e-4, 2,000 warm-up steps, cosine; captions of 40
BERT-uncased word pieces. The paper starts from a synthetic (non-private) warm start.
"""

import ml_collections

from configs import dpcap_tiny
from configs import laion


def get_config():
  c = dpcap_tiny.get_config()
  c.steps = 5_708

  c.data = laion.laion233m_data()

  c.tokenizer.type = "wordpiece"
  c.tokenizer.vocab_file = "vocab/bert-base-uncased.txt"  # public BERT vocabulary (30,522)
  c.tokenizer.max_len = 40

  c.model.dtype = "bfloat16"
  c.model.encoder = ml_collections.ConfigDict(laion.vit_b16(qkv_bias=False))
  c.model.decoder = ml_collections.ConfigDict(dict(
      width=768, depth=6, num_heads=12, mlp_dim=3072))

  c.batch.expected_size = 1_310_720
  c.batch.microbatch_size = 16_384  # 128 per device on 128 devices

  c.privacy.clip_norm = 1.0
  c.privacy.target_epsilon = 8.0
  c.privacy.delta = None  # 1/N
  c.privacy.accountant = "pld"

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5.12e-4, b1=0.9, b2=0.95, weight_decay=0.005, warmup_steps=2_000,
      schedule="cosine"))
  c.log_every = 10
  c.checkpoint_every = 100
  return c
