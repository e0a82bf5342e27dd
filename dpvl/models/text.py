"""Causal text decoder with cross-attention to a memory of image tokens (DP-Cap's decoder)."""

import jax.numpy as jnp
from flax import linen as nn

from dpvl.models.vit import Mlp


class DecoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory, causal_mask):
    attention = lambda name: nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, use_bias=self.use_bias, dtype=self.dtype, name=name)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + attention("self_attention")(y, y, mask=causal_mask)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + attention("cross_attention")(y, memory)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + Mlp(self.mlp_dim, use_bias=self.use_bias, dtype=self.dtype)(y)


class TextDecoder(nn.Module):
  """tokens [B, L], memory [B, T, width] -> logits [B, L, vocab_size] (position t sees <= t)."""

  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, memory):
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"{length} tokens exceed the decoder's max_len {self.max_len}.")
    embed = nn.Embed(self.vocab_size, self.width, name="token_embedding")
    x = embed(tokens).astype(self.dtype)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.width))
    x = x + pos[:length].astype(self.dtype)[None]
    causal = nn.make_causal_mask(tokens)
    for i in range(self.depth):
      x = DecoderBlock(self.num_heads, self.mlp_dim, self.use_bias, self.dtype,
                       name=f"block{i}")(x, memory.astype(self.dtype), causal)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    return nn.Dense(self.vocab_size, use_bias=self.use_bias, dtype=self.dtype,
                    name="head")(x)
