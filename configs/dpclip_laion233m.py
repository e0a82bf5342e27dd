"""DP-CLIP at paper scale: ViT-B/16 + 12-layer text transformer, DP on 233M LAION pairs.

  python -m dpvl.main --config=configs/dpclip_laion233m.py --mode=account
  python -m dpvl.main --config=configs/dpclip_laion233m.py --mode=account \\
      --config.privacy.mechanism=logit_dp

Expected batch 32,768 (CLIP's), 10,000 steps (~1.4 epochs), target epsilon 8 at delta = 1/N.
per_batch (default): hash groups of ~1,024 pairs (32 groups; each group's loss is clipped as a
unit, sensitivity 2C). logit_dp: clips every pair's similarity gradient; its sensitivity is
O(1) in the batch only for a warm fixed temperature (grows like exp(2 / temperature)), hence
`model.temperature = 0.5` there; pair norms from the per-example Jacobians' top eigenvalues
(`pair_norms="bound"`, O(n) memory).
"""

import ml_collections

from configs import dpclip_tiny
from configs import laion


def get_config():
  c = dpclip_tiny.get_config()
  c.steps = 10_000

  c.data = laion.laion233m_data()

  c.tokenizer.type = "wordpiece"
  c.tokenizer.vocab_file = "vocab/bert-base-uncased.txt"  # public BERT vocabulary (30,522)
  c.tokenizer.max_len = 77

  c.model.dtype = "bfloat16"
  c.model.encoder = ml_collections.ConfigDict(laion.vit_b16(qkv_bias=False))
  c.model.text = ml_collections.ConfigDict(dict(width=512, depth=12, num_heads=8,
                                                mlp_dim=2048))
  c.model.embed_dim = 512
  c.model.temperature = 0.5

  c.batch.expected_size = 32_768
  c.batch.microbatch_size = 2_048  # logit_dp's micro-batch (16 per device on 128 devices)
  c.batch.slot_multiple = 128      # per_batch: a group's slots split evenly over 128 devices

  c.privacy.mechanism = "per_batch"
  c.privacy.group_size = 1_024
  c.privacy.pair_norms = "bound"
  c.privacy.clip_norm = 1.0
  c.privacy.target_epsilon = 8.0
  c.privacy.delta = None  # 1/N
  c.privacy.accountant = "pld"

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-4, b1=0.9, b2=0.98, weight_decay=0.2, warmup_steps=1_000,
      schedule="cosine"))
  c.evals = ml_collections.ConfigDict(dict(
      zero_shot_colour=dpclip_tiny.evals.scene_zero_shot("colour", image_size=224, every=1_000),
      retrieval=dpclip_tiny.evals.scene_retrieval(image_size=224, every=1_000)))
  c.log_every = 10
  c.checkpoint_every = 100
  return c
