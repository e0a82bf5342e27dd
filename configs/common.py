"""The blocks every config builds from: the run, data, tokenizer, batch, privacy and optimizer.

Not a config (it has no get_config()). A config reads as these blocks plus what its run sets;
each function returns a fresh ConfigDict, and keyword overrides replace or add fields.
"""

import ml_collections

BERT_VOCAB = "vocab/bert-base-uncased.txt"  # public BERT-uncased word pieces (30,522)


def run(objective: str, steps: int, log_every: int = 10,
        checkpoint_every: int = 100) -> ml_collections.ConfigDict:
  """The top level of a config: objective, seed, steps and how often to log and checkpoint."""
  return ml_collections.ConfigDict(dict(
      objective=objective, seed=0, steps=steps,
      init_from="",  # workdir of a non-private stage-1 run (e.g. on synthetic data) to start from
      log_every=log_every, checkpoint_every=checkpoint_every,
      # Log `private_data_diagnostics` (loss, batch size, clipping statistics computed on the
      # private data without noise); False when the run's logs leave the trust boundary.
      log_private_diagnostics=True,
      # TAN simulation (Sander et al., 2023) for cheap tuning: batch_size B' > 0 trains at
      # expected batch B' with sigma * B' / B and the same steps and learning rate, to predict
      # the run at config.batch.expected_size = B. NO privacy guarantee (docs/privacy.md).
      tan=dict(batch_size=0)))


def scene_data(size: int, max_objects: int = 1) -> ml_collections.ConfigDict:
  """Generated 32-pixel shape scenes (`dpvl.data.shape_scenes`): N = `size` private records."""
  return ml_collections.ConfigDict(dict(
      source="shape_scenes", size=size, image_size=32, seed=0, max_objects=max_objects,
      # Input pipeline (docs/data.md): "center" uses the scenes as drawn; "random_resized"
      # draws a crop of `crop_scale` of the area (and a flip with `flip`) at every step.
      crop="center", crop_scale=(0.2, 1.0), flip=False, normalization="half",
      public=False,  # True only for public data: then this run may seed a private one
      max_skip_fraction=0.05))  # stop when far more records than this are unusable


def byte_tokenizer(max_len: int) -> ml_collections.ConfigDict:
  """UTF-8 bytes: needs no vocabulary fit on private data."""
  return ml_collections.ConfigDict(dict(type="byte", vocab_file="", max_len=max_len))


def bert_tokenizer(max_len: int) -> ml_collections.ConfigDict:
  """Word pieces of the public BERT-uncased vocabulary (`BERT_VOCAB`)."""
  return ml_collections.ConfigDict(dict(type="wordpiece", vocab_file=BERT_VOCAB,
                                        max_len=max_len))


def batch(expected_size: int, microbatch_size: int, **extra) -> ml_collections.ConfigDict:
  """Expected Poisson batch size q * N; examples per micro-batch (speed and memory only)."""
  return ml_collections.ConfigDict(dict(expected_size=expected_size,
                                        microbatch_size=microbatch_size, **extra))


def mesh(**overrides) -> ml_collections.ConfigDict:
  """Every device on the data axis; the state sharded over `fsdp` when it has more than one
  (`dpvl.parallel.mesh`: axis sizes, -1 for the rest, and the (regex, strategy) rules)."""
  c = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, model=1,
      rules=((".*", "fsdp"),),  # first match decides: "fsdp", "replicate" or a spec tuple
      fsdp_min_size=2**16))  # leaves with fewer elements stay replicated
  c.update(overrides)
  return c


def privacy(**overrides) -> ml_collections.ConfigDict:
  """DP-SGD at epsilon 8 (PLD accountant, delta = 1/N, C = 1), sigma calibrated to it."""
  c = ml_collections.ConfigDict()
  c.enabled = True
  c.clip_norm = 1.0
  # How clipped sums are computed (per_example, per_batch): "ghost" (book-keeping: norms and
  # sums from one backward pass, faster and leaner) or "vmap" (per-example gradients, the
  # reference). The same sum to float rounding; never the guarantee.
  c.clipping = "ghost"
  c.target_epsilon = 8.0
  # Typed so that `--config.privacy.noise_multiplier=0.7` works; None: calibrated.
  c.noise_multiplier = ml_collections.FieldReference(None, field_type=float)
  c.delta = ml_collections.FieldReference(None, field_type=float)  # None: 1/N
  c.accountant = "pld"  # "pld" or "rdp"
  c.truncation_tolerance = 1e-3  # truncation may use this fraction of delta
  # The DP loss estimate `dp_loss` (off by default; docs/privacy.md): each example's loss
  # clipped to [0, bound] (10: a uniform guess over 22,000 tokens or classes), summed, released
  # with noise of multiplier noise_ratio * sigma. Ratio 10 costs 0.5% of sigma: the accountant
  # sees (sigma^-2 + (10 sigma)^-2)^-1/2. The estimate's std is then 10 sigma bound / B
  # (5.6e-5 in the DP-Cap paper run). A config without the field releases none.
  c.loss_estimate = ml_collections.ConfigDict(dict(enabled=False, bound=10.0, noise_ratio=10.0))
  # Seed of the Poisson sampler and the noise. Keep it secret: None draws one from the OS at
  # the first step and keeps it in the (private) checkpoint.
  c.seed = ml_collections.FieldReference(None, field_type=int)
  c.update(overrides)
  return c


def optimizer(learning_rate: float, warmup_steps: int,
              **overrides) -> ml_collections.ConfigDict:
  """AdamW (0.9, 0.95), weight decay 0.005; warm-up, then `schedule` (`dpvl.optim`)."""
  c = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, b1=0.9, b2=0.95, weight_decay=0.005,
      warmup_steps=warmup_steps, schedule="cosine"))
  c.update(overrides)
  return c
