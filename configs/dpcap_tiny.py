"""DP-Cap demo: a tiny captioner trained with DP-SGD on generated shape scenes (CPU, minutes)."""

import ml_collections

from configs import evals


def get_config():
  c = ml_collections.ConfigDict()
  c.objective = "dpcap"
  c.seed = 0
  c.steps = 150
  c.init_from = ""  # workdir of a non-private stage-1 run (e.g. on synthetic data) to start from

  c.data = ml_collections.ConfigDict()
  c.data.source = "shape_scenes"
  c.data.size = 20_000          # N, the number of private records
  c.data.image_size = 32
  c.data.seed = 0
  c.data.max_objects = 1
  c.data.public = False         # True only for public data: then this run may seed a private one
  c.data.max_skip_fraction = 0.05  # stop when far more records than this are unusable

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.type = "byte"     # needs no vocabulary fit on private data
  c.tokenizer.vocab_file = ""   # a public word-piece vocab.txt when type == "wordpiece"
  c.tokenizer.max_len = 48

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"
  c.model.encoder = ml_collections.ConfigDict(dict(
      patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, qkv_bias=True,
      posemb="sincos2d"))
  c.model.decoder = ml_collections.ConfigDict(dict(
      width=64, depth=2, num_heads=4, mlp_dim=128))

  c.batch = ml_collections.ConfigDict()
  c.batch.expected_size = 256   # expected Poisson batch size q * N
  c.batch.microbatch_size = 64  # examples per micro-batch (speed/memory only)

  c.privacy = ml_collections.ConfigDict()
  c.privacy.enabled = True
  c.privacy.clip_norm = 1.0
  c.privacy.target_epsilon = 8.0
  c.privacy.noise_multiplier = ml_collections.FieldReference(None, field_type=float)
  c.privacy.delta = ml_collections.FieldReference(None, field_type=float)  # None: 1/N
  c.privacy.accountant = "pld"  # "pld" or "rdp"
  c.privacy.sampling = "poisson"
  c.privacy.truncation_tolerance = 1e-3  # truncation may use this fraction of delta
  # Seed of the Poisson sampler and the noise. Keep it secret: None draws one from the OS at
  # the first step and keeps it in the (private) checkpoint.
  c.privacy.seed = ml_collections.FieldReference(None, field_type=int)

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, b1=0.9, b2=0.95, weight_decay=0.005, warmup_steps=15,
      schedule="cosine"))

  # Linear probe on the encoder before and after training (shape of one-object scenes).
  c.evals = ml_collections.ConfigDict(dict(
      probe=evals.scene_probe("label", blocks=c.model.encoder.depth)))

  c.log_every = 10
  c.checkpoint_every = 50
  return c
