"""Masked autoencoder (ViP / MAE): the shared ViT encodes the visible patches, a light
transformer decoder fills in mask tokens and predicts every patch's pixels.

Both position embeddings are fixed 2-D sin-cos constants, never parameters.
"""

from typing import Any, Mapping

from flax import linen as nn
import jax.numpy as jnp

from dpvl.models.vit import EncoderBlock
from dpvl.models.vit import ViT
from dpvl.models.vit import sincos2d


class MaskedAutoencoder(nn.Module):
  """(images [B, H, W, 3], keep [B, K] visible patch indices) -> pixels [B, T, p*p*3]."""

  encoder: Mapping[str, Any]   # ViT keyword arguments
  decoder: Mapping[str, Any]   # width, depth, num_heads, mlp_dim
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, keep):
    p = self.encoder["patch_size"]
    h, w = images.shape[1] // p, images.shape[2] // p
    latent = ViT(**self.encoder, dtype=self.dtype, name="vit")(images, keep=keep)
    width = self.decoder["width"]
    x = nn.Dense(width, dtype=self.dtype, name="bridge")(latent)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (width,))
    full = jnp.broadcast_to(mask_token.astype(x.dtype), (x.shape[0], h * w, width))
    full = full.at[jnp.arange(x.shape[0])[:, None], keep].set(x)
    full = full + jnp.asarray(sincos2d(h, w, width)).astype(x.dtype)[None]
    for i in range(self.decoder["depth"]):
      full = EncoderBlock(self.decoder["num_heads"], self.decoder["mlp_dim"], dtype=self.dtype,
                          name=f"decoder_block{i}")(full)
    full = nn.LayerNorm(dtype=self.dtype, name="decoder_norm")(full)
    return nn.Dense(p * p * images.shape[-1], dtype=jnp.float32, name="pixels")(
        full.astype(jnp.float32))
