"""CLIP's two towers: images and captions to L2-normalised embeddings of one width.

The towers share no parameter (the contrastive mechanisms rely on it, see
`dpvl.privacy.contrastive`), and nothing mixes the examples of a batch.
"""

from flax import linen as nn
import jax.numpy as jnp

from dpvl.models.text import embed_tokens
from dpvl.models.vit import EncoderBlock
from dpvl.models.vit import ViT


def l2_normalize(x, eps: float = 1e-6):
  """x / ||x|| along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps**2)


class ImageTower(nn.Module):
  """images [B, H, W, 3] -> embeddings [B, embed_dim]: ViT, mean-pooled patch tokens (a class
  token is left out), linear map."""

  encoder: dict
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    vit = ViT(**self.encoder, dtype=self.dtype, name="vit")
    tokens = vit(images)[:, vit.num_prefix_tokens:]
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
    return l2_normalize(nn.Dense(self.embed_dim, use_bias=False, name="proj")(pooled))


class TextTower(nn.Module):
  """tokens [B, L] (BOS, ..., EOS, padding) -> embeddings [B, embed_dim].

  A causal transformer; the caption's embedding is read at its first EOS (the last position if
  it has none), which has seen the whole caption and none of the padding (as in CLIP).
  """

  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  embed_dim: int
  eos_id: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    x = embed_tokens(self, tokens, "text tower")
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, causal=True,
                       name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    is_eos = tokens == self.eos_id
    end = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), tokens.shape[1] - 1)
    pooled = jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return l2_normalize(nn.Dense(self.embed_dim, use_bias=False, name="proj")(pooled))
