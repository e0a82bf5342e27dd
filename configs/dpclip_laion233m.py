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

from configs import common
from configs import evals
from configs import laion


def get_config():
  c = common.run("dpclip", steps=10_000)
  c.data = laion.laion233m_data()
  c.tokenizer = common.bert_tokenizer(max_len=77)

  c.model = ml_collections.ConfigDict(dict(
      dtype="bfloat16",
      encoder=laion.vit_b16(qkv_bias=False),
      text=dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
      embed_dim=512,
      temperature=0.5))

  c.batch = common.batch(
      expected_size=32_768,
      microbatch_size=2_048,  # logit_dp's micro-batch (16 per device on 128 devices)
      slot_multiple=128)      # per_batch: a group's slots split evenly over 128 devices
  c.mesh = common.mesh()
  c.privacy = common.privacy(mechanism="per_batch", group_size=1_024, pair_norms="bound")
  c.optimizer = common.optimizer(learning_rate=5e-4, warmup_steps=1_000, b2=0.98,
                                 weight_decay=0.2)

  c.evals = ml_collections.ConfigDict(dict(
      zero_shot_colour=evals.scene_zero_shot("colour", image_size=224, every=1_000),
      retrieval=evals.scene_retrieval(image_size=224, every=1_000)))
  return c
