"""DP-CLIP demo: a tiny dual encoder trained with DP on generated captioned scenes (CPU, minutes).

  python -m dpvl.main --config=configs/dpclip_tiny.py --workdir=runs/dpclip_tiny \\
      --config.privacy.mechanism=logit_dp      # or per_batch (the default)
"""

import ml_collections

from configs import evals


def get_config():
  c = ml_collections.ConfigDict()
  c.objective = "dpclip"
  c.seed = 0
  c.steps = 200
  c.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "shape_scenes"
  c.data.size = 50_000          # N, the number of private image-caption pairs
  c.data.image_size = 32
  c.data.seed = 0
  c.data.max_objects = 1
  c.data.public = False         # True only for public data: then this run may seed a private one
  c.data.max_skip_fraction = 0.05  # stop when far more records than this are unusable

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.type = "byte"
  c.tokenizer.vocab_file = ""
  c.tokenizer.max_len = 40

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"
  # Small towers and embeddings: Logit-DP costs embed_dim backward passes per example, and the
  # noise's norm grows with the square root of the parameter count.
  c.model.encoder = ml_collections.ConfigDict(dict(
      patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, qkv_bias=True,
      posemb="sincos2d"))
  c.model.text = ml_collections.ConfigDict(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  c.model.embed_dim = 8
  # Fixed softmax temperature: Logit-DP's sensitivity grows like exp(2 / temperature)
  # (16.6 C at 1.0 for this batch, 180 C at 0.5).
  c.model.temperature = 1.0

  c.batch = ml_collections.ConfigDict()
  c.batch.expected_size = 1_024
  c.batch.microbatch_size = 64  # logit_dp's micro-batch; per_batch uses one per group
  c.batch.slot_multiple = 8     # per_batch: group slots rounded up to a multiple of this

  c.privacy = ml_collections.ConfigDict()
  c.privacy.enabled = True
  c.privacy.mechanism = "per_batch"  # or "logit_dp"
  c.privacy.group_size = 64          # per_batch: expected pairs per group
  c.privacy.pair_norms = "exact"     # logit_dp: "exact" (Gram matrices) or "bound"
  c.privacy.clip_norm = 1.0
  c.privacy.target_epsilon = 8.0
  c.privacy.noise_multiplier = ml_collections.FieldReference(None, field_type=float)
  c.privacy.delta = ml_collections.FieldReference(None, field_type=float)  # None: 1/N
  c.privacy.accountant = "pld"
  c.privacy.sampling = "poisson"
  c.privacy.truncation_tolerance = 1e-3
  c.privacy.seed = ml_collections.FieldReference(None, field_type=int)

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, b1=0.9, b2=0.95, weight_decay=0.005, warmup_steps=20,
      schedule="cosine"))

  c.evals = ml_collections.ConfigDict(dict(
      zero_shot_colour=evals.scene_zero_shot("colour"),
      zero_shot_shape=evals.scene_zero_shot("shape"),
      retrieval=evals.scene_retrieval()))

  c.log_every = 10
  c.checkpoint_every = 100
  return c
