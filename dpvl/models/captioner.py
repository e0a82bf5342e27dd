"""DP-Cap's captioner: ViT encoder -> linear bridge -> causal text decoder."""

from typing import Any, Mapping

import jax.numpy as jnp
from flax import linen as nn

from dpvl.models.text import TextDecoder
from dpvl.models.vit import ViT


class Captioner(nn.Module):
  """(images [B, H, W, 3], tokens [B, L]) -> next-token logits [B, L, vocab]."""

  encoder: Mapping[str, Any]
  decoder: Mapping[str, Any]
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.vit = ViT(**self.encoder, dtype=self.dtype)
    self.bridge = nn.Dense(self.decoder["width"], use_bias=False, dtype=self.dtype)
    self.text = TextDecoder(**self.decoder, dtype=self.dtype)

  def encode_images(self, images):
    return self.bridge(self.vit(images))

  def decode(self, tokens, memory):
    return self.text(tokens, memory)

  def __call__(self, images, tokens):
    return self.decode(tokens, self.encode_images(images))
