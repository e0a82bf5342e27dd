"""Masked autoencoder (ViP / MAE): the shared ViT encodes the visible patches, a light
transformer decoder fills in mask tokens and predicts every patch's pixels.

Both position embeddings are fixed 2-D sin-cos constants, never parameters. With a class token
(`encoder["cls_token"]`, MAE's layout) the encoder sees [cls, visible patches]; the decoder
embeds them, puts the mask tokens in the masked patches' places after the cls, adds its
position embeddings (zero on the cls) and drops the cls from the prediction.
"""

import dataclasses
from typing import Any, ClassVar, Mapping

from flax import linen as nn
import jax.numpy as jnp

from dpvl.models import vit as vit_lib
from dpvl.models.vit import EncoderBlock
from dpvl.models.vit import ViT


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """The MAE decoder's fields (`config.model.decoder`): a transformer of `depth` pre-LN blocks.

  `dense_init` and `gelu` as the ViT's (`dpvl.models.vit`); they also set the decoder's input
  map ("bridge") and pixel head initializers.
  """

  CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {
      "dense_init": tuple(vit_lib.DENSE_INITS), "gelu": tuple(vit_lib.GELUS)}

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dense_init: str = "lecun"
  gelu: str = "tanh"


class MaskedAutoencoder(nn.Module):
  """(images [B, H, W, 3], keep [B, K] visible patch indices) -> pixels [B, T, p*p*3]."""

  encoder: Mapping[str, Any]   # ViT keyword arguments
  decoder: Mapping[str, Any]   # `DecoderSpec` fields
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, keep):
    p = self.encoder["patch_size"]
    h, w = images.shape[1] // p, images.shape[2] // p
    dec = DecoderSpec(**self.decoder)
    vit = ViT(**self.encoder, dtype=self.dtype, name="vit")
    latent = vit(images, keep=keep)  # [B, P + K, width]: the class token first, if any
    prefix = vit.num_prefix_tokens
    init = vit_lib.dense_init(dec.dense_init)
    x = nn.Dense(dec.width, kernel_init=init, dtype=self.dtype, name="bridge")(latent)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (dec.width,))
    full = jnp.broadcast_to(mask_token.astype(x.dtype), (x.shape[0], h * w, dec.width))
    full = full.at[jnp.arange(x.shape[0])[:, None], keep].set(x[:, prefix:])
    full = jnp.concatenate([x[:, :prefix], full], axis=1)
    pos = vit_lib.sincos2d_prefixed(h, w, dec.width, prefix)
    full = full + jnp.asarray(pos).astype(x.dtype)[None]
    for i in range(dec.depth):
      full = EncoderBlock(dec.num_heads, dec.mlp_dim, dtype=self.dtype, dense_init=dec.dense_init,
                          gelu=dec.gelu, name=f"decoder_block{i}")(full)
    full = full[:, prefix:]  # the prediction drops the class token (token-wise from here on)
    full = nn.LayerNorm(dtype=self.dtype, name="decoder_norm")(full)
    return nn.Dense(p * p * images.shape[-1], kernel_init=init, dtype=jnp.float32,
                    name="pixels")(full.astype(jnp.float32))
