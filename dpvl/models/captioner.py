"""DP-Cap's captioner: ViT encoder -> linear bridge -> causal text decoder."""

from typing import Any, Mapping

from flax import linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from dpvl.models.text import TextDecoder
from dpvl.models.vit import ViT


class Captioner(nn.Module):
  """(images [B, H, W, 3], tokens [B, L]) -> float32 next-token logits [B, L, vocab].

  Attributes:
    encoder: `ViT` keyword arguments (patch_size, width, depth, num_heads, mlp_dim, ...).
    decoder: `TextDecoder` keyword arguments (vocab_size, max_len, width, depth, ...).
    dtype: activation dtype of both towers (parameters stay float32).
  """

  encoder: Mapping[str, Any]
  decoder: Mapping[str, Any]
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    # Frozen, so that the module hashes (a static argument of `jax.jit`).
    object.__setattr__(self, "encoder", FrozenDict(self.encoder))
    object.__setattr__(self, "decoder", FrozenDict(self.decoder))
    super().__post_init__()

  def setup(self):
    self.vit = ViT(**self.encoder, dtype=self.dtype)
    self.bridge = nn.Dense(self.decoder["width"], use_bias=False, dtype=self.dtype)
    self.text = TextDecoder(**self.decoder, dtype=self.dtype)

  def encode_images(self, images):
    """Image tokens mapped to the decoder's width: [B, T, decoder width]."""
    return self.bridge(self.vit(images))

  def decode(self, tokens, memory):
    """Logits [B, L, vocab] of tokens [B, L] given a memory from `encode_images`."""
    return self.text(tokens, memory)

  def __call__(self, images, tokens):
    return self.decode(tokens, self.encode_images(images))
