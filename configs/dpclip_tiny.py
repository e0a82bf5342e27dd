"""DP-CLIP demo: a tiny dual encoder trained with DP on generated captioned scenes (CPU, minutes).

  python -m dpvl.main --config=configs/dpclip_tiny.py --workdir=runs/dpclip_tiny \\
      --config.privacy.mechanism=logit_dp      # or per_batch (the default)
"""

import ml_collections

from configs import common
from configs import evals


def get_config():
  c = common.run("dpclip", steps=200)
  c.data = common.scene_data(size=50_000)  # N, the number of private image-caption pairs
  c.tokenizer = common.byte_tokenizer(max_len=40)

  # Small towers and embeddings: Logit-DP costs embed_dim backward passes per example, and the
  # noise's norm grows with the square root of the parameter count.
  c.model = ml_collections.ConfigDict(dict(
      dtype="float32",
      encoder=dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, qkv_bias=True,
                   posemb="sincos2d"),
      text=dict(width=32, depth=2, num_heads=2, mlp_dim=64),
      embed_dim=8,
      # Fixed softmax temperature: Logit-DP's sensitivity grows like exp(2 / temperature)
      # (16.6 C at 1.0 for this batch, 180 C at 0.5).
      temperature=1.0))

  c.batch = common.batch(
      expected_size=1_024,
      microbatch_size=64,  # logit_dp's micro-batch; per_batch uses one per group
      slot_multiple=8)     # per_batch: group slots rounded up to a multiple of this
  c.mesh = common.mesh()
  c.privacy = common.privacy(
      mechanism="per_batch",  # or "logit_dp"
      group_size=64,          # per_batch: expected pairs per group
      pair_norms="exact")     # logit_dp: "exact" (Gram matrices) or "bound"
  c.optimizer = common.optimizer(learning_rate=2e-3, warmup_steps=20)

  c.evals = ml_collections.ConfigDict(dict(
      zero_shot_colour=evals.scene_zero_shot("colour"),
      zero_shot_shape=evals.scene_zero_shot("shape"),
      retrieval=evals.scene_retrieval()))
  return c
