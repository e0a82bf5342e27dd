"""DP-Cap: image captioning as a private pretraining objective (Sander et al., 2024).

The privacy unit is one image-caption pair, and its loss is the mean next-token cross-entropy
over the caption's real target tokens (padding ignored): one loss per pair, whatever its length.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpvl.data import tokenizers
from dpvl.data import transforms
from dpvl.models.captioner import Captioner
from dpvl.objectives import Objective


def masked_token_loss(logits, targets, pad_id: int):
  """Mean cross-entropy of `targets` [L] under `logits` [L, V] over non-pad targets (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
  weights = (targets != pad_id).astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def model_from_config(config, vocab_size: int) -> Captioner:
  dec = dict(config.model.decoder)
  return Captioner(
      encoder=dict(config.model.encoder),
      decoder=dict(vocab_size=vocab_size, max_len=config.tokenizer.max_len - 1, **dec),
      dtype=jnp.dtype(config.model.dtype))


def build(config) -> Objective:
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  model = model_from_config(config, tokenizer.vocab_size)
  size, length = config.data.image_size, config.tokenizer.max_len
  if size % config.model.encoder.patch_size:
    raise ValueError(f"config.data.image_size={size} is not a multiple of "
                     f"config.model.encoder.patch_size={config.model.encoder.patch_size}.")
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
    return dict(image=transforms.normalize_image(record["image"]),
                tokens=tokenizer.encode(caption))

  def per_example_loss(params, example, rng):
    del rng  # deterministic
    tokens = example["tokens"]
    logits = model.apply({"params": params}, example["image"][None], tokens[None, :-1])[0]
    return masked_token_loss(logits, tokens[1:], tokenizer.pad_id)

  return Objective(name="dpcap", init=init, per_example_loss=per_example_loss,
                   prepare=prepare, example_spec=spec, model=model)


def greedy_decode(model: Captioner, params, images, length: int, bos_id: int):
  """Greedy captions [B, length] (starting with BOS) for images [B, H, W, 3]."""
  memory = model.apply({"params": params}, images, method=Captioner.encode_images)
  tokens = jnp.zeros((images.shape[0], length), jnp.int32).at[:, 0].set(bos_id)

  def body(t, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1], memory, method=Captioner.decode)
    return tokens.at[:, t + 1].set(jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32))

  return jax.lax.fori_loop(0, length - 1, body, tokens)


def caption_images(objective: Objective, params, images: np.ndarray, config) -> list[str]:
  """Greedy captions (text) for uint8 images [B, H, W, 3]."""
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  x = np.stack([transforms.normalize_image(im) for im in images])
  decode = jax.jit(functools.partial(greedy_decode, objective.model,
                                     length=config.tokenizer.max_len, bos_id=tokenizer.bos_id))
  ids = decode(params, x)
  return [tokenizer.decode(row) for row in np.asarray(ids)]
