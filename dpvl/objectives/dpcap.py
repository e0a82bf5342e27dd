"""DP-Cap: image captioning as a private pretraining objective (Sander et al., 2024).

The privacy unit is one image-caption pair, and its loss is the mean next-token cross-entropy
over the caption's target tokens up to its first EOS (padding and anything after EOS ignored):
one loss per pair, whatever its length. Activations use `config.model.dtype`; parameters, logits
and the loss are float32. The published layout (post-LN decoder, fixed sin-cos text and memory
positions, a frozen class token) is a set of options, see `configs/dpcap_laion233m.py`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpvl import config as config_lib
from dpvl import objectives
from dpvl.data import tokenizers
from dpvl.data import transforms
from dpvl.models.captioner import Captioner
from dpvl.models.text import TextDecoder
from dpvl.models.vit import vit_features


def target_weights(targets, pad_id: int, eos_id: int | None = None):
  """float32 [L]: 1 on the targets that count, 0 on the others.

  A target counts when it is not padding and, given `eos_id`, no EOS comes before it (the first
  EOS itself counts): whatever follows the end of the caption is ignored.

  Args:
    targets: int [L] target token ids of one caption (1-D: the EOS count runs over all of it).
    pad_id: the padding token's id.
    eos_id: the EOS token's id; None counts every non-padding target.

  Returns:
    float32 [L] weights in {0, 1}.
  """
  keep = targets != pad_id
  if eos_id is not None:
    is_eos = targets == eos_id
    eos_before = (jnp.cumsum(is_eos) - is_eos) > 0
    keep = (keep | is_eos) & ~eos_before
  return keep.astype(jnp.float32)


def masked_token_loss(logits, targets, pad_id: int, eos_id: int | None = None):
  """Mean cross-entropy of `targets` [L] under `logits` [L, V] over the counted targets.

  See `target_weights`. Computed in float32; 0 when no target counts (never nan).

  Args:
    logits: [L, V] next-token logits of one caption.
    targets: int [L] target token ids.
    pad_id: the padding token's id.
    eos_id: the EOS token's id; None counts every non-padding target.

  Returns:
    float32 scalar: the mean negative log-likelihood of the counted targets.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
  weights = target_weights(targets, pad_id, eos_id)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def model_from_config(config, vocab_size: int) -> Captioner:
  """The captioner of `config.model`; the decoder reads max_len - 1 input tokens.

  Besides the encoder and decoder sections, `config.model.bridge_bias` (default False) and
  `config.model.memory_posemb` (default "none") set the bridge (`Captioner`).
  """
  dec = dict(config.model.decoder)
  return Captioner(
      encoder=dict(config.model.encoder),
      decoder=dict(vocab_size=vocab_size, max_len=config.tokenizer.max_len - 1, **dec),
      dtype=objectives.model_dtype(config),
      bridge_bias=config.model.get("bridge_bias", False),
      memory_posemb=config.model.get("memory_posemb", "none"))


def check_model(config) -> None:
  """ConfigError naming the field for a `config.model` that the modules would reject at init."""
  objectives.check_encoder(config)
  objectives.check_transformer(config, "model.decoder", TextDecoder,
                               given=("vocab_size", "max_len"))
  bias = config.model.get("bridge_bias", False)
  config_lib.check(isinstance(bias, bool),
                   f"config.model.bridge_bias must be True or False, got {bias!r}.")
  posemb = config.model.get("memory_posemb", "none")
  config_lib.check(posemb in Captioner.MEMORY_POSEMBS, f"config.model.memory_posemb={posemb!r} "
                   "is unknown; use 'none' or 'sincos2d'.")
  width = config.model.decoder.width
  config_lib.check(posemb != "sincos2d" or width % 4 == 0, f"config.model.decoder.width={width} "
                   "must be divisible by 4 for sin-cos memory position embeddings.")


def build(config) -> objectives.PerExampleObjective:
  """DP-Cap: per-example mean next-token cross-entropy of a caption given its image."""
  check_model(config)
  tokenizer = tokenizers.build_tokenizer(config_lib.get_field(config, "tokenizer"))
  model = model_from_config(config, tokenizer.vocab_size)
  size, length = objectives.image_size(config), config.tokenizer.max_len
  normalization = objectives.normalization(config)
  spec = dict(image=jax.ShapeDtypeStruct((size, size, 3), jnp.float32),
              tokens=jax.ShapeDtypeStruct((length,), jnp.int32))

  def init(rng):
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, length - 1), jnp.int32)
    return model.init(rng, images, tokens)["params"]

  def prepare(record):
    caption = record["caption"]
    if not isinstance(caption, (str, bytes)):
      raise ValueError(f"caption must be text, got {type(caption).__name__}.")
    image = transforms.model_image(record["image"], size, normalization)
    return dict(image=image, tokens=tokenizer.encode(caption))

  def per_example_loss(params, example, rng):
    """Loss of ONE example: image [S, S, 3], tokens [L] (BOS, ..., EOS, pad...)."""
    del rng  # deterministic
    tokens = example["tokens"]
    logits = model.apply({"params": params}, example["image"][None], tokens[None, :-1])[0]
    return masked_token_loss(logits, tokens[1:], tokenizer.pad_id, tokenizer.eos_id)

  return objectives.PerExampleObjective(
      name="dpcap", init=init, per_example_loss=per_example_loss, prepare=prepare,
      example_spec=spec, model=model, encode=vit_features(config.model.encoder, model.dtype),
      image_size=size, normalization=normalization)


def greedy_decode(model: Captioner, params, images, max_len: int, bos_id: int,
                  eos_id: int | None = None, pad_id: int = 0):
  """Greedy captions int32 [B, max_len] for images [B, H, W, 3]: BOS, tokens, EOS, pad.

  A fixed-length loop (jit-able, no cache: the decoder reruns on the whole prefix each step).
  With `eos_id`, every token after a caption's first EOS is `pad_id`. `max_len` is at most the
  tokenizer's max_len (the decoder reads max_len - 1 tokens).

  Args:
    model: the captioner.
    params: its parameters.
    images: float [B, H, W, 3], normalised (`objective.normalize`).
    max_len: length of the output, BOS included.
    bos_id: the BOS token's id, the first token of every caption.
    eos_id: the EOS token's id; None decodes all `max_len - 1` tokens.
    pad_id: the padding token's id.

  Returns:
    int32 [B, max_len] token ids.
  """
  memory = model.apply({"params": params}, images, method=Captioner.encode_images)
  tokens = jnp.full((images.shape[0], max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  done = jnp.zeros((images.shape[0],), bool)

  def body(t, carry):
    tokens, done = carry
    logits = model.apply({"params": params}, tokens[:, :-1], memory, method=Captioner.decode)
    next_token = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)
    tokens = tokens.at[:, t + 1].set(jnp.where(done, pad_id, next_token))
    if eos_id is not None:
      done = done | (next_token == eos_id)
    return tokens, done

  return jax.lax.fori_loop(0, max_len - 1, body, (tokens, done))[0]


def caption_images(objective: objectives.Objective, params, images: np.ndarray,
                   config) -> list[str]:
  """Greedy captions (text) for uint8 images [B, H, W, 3].

  Args:
    objective: the DP-Cap objective (its `model`).
    params: the captioner's parameters.
    images: uint8 [B, H, W, 3]; normalised here, not resized (H and W multiples of the
      encoder's patch size).
    config: the run's config (its `tokenizer`).

  Returns:
    B captions, decoded by the tokenizer of `config.tokenizer` (up to `max_len` tokens).
  """
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  x = objective.normalize(np.stack(images))
  decode = jax.jit(functools.partial(
      greedy_decode, objective.model, max_len=config.tokenizer.max_len,
      bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id))
  ids = decode(params, x)
  return [tokenizer.decode(row) for row in np.asarray(ids)]
