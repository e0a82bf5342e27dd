"""Vision Transformer encoder, shared by every objective (MAE, captioning, CLIP).

Pre-LN blocks, no class token (pool later), nothing that mixes examples (no BatchNorm, no
dropout): it runs under per-example `vmap` for DP-SGD. Fixed 2-D sin-cos position embeddings
are a constant, not a parameter, so no optimizer step can change them.
"""

import einops
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def sincos2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings, float32 [height * width, dim] (MAE's recipe)."""
  if dim % 4:
    raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}.")
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))
  y = y.reshape(-1, 1) * omega[None]
  x = x.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class Mlp(nn.Module):
  hidden: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = x.shape[-1]
    x = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype)(x)
    x = nn.gelu(x)
    return nn.Dense(out, use_bias=self.use_bias, dtype=self.dtype)(x)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, use_bias=self.qkv_bias,
                                        dtype=self.dtype)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    return x + Mlp(self.mlp_dim, dtype=self.dtype)(y)


class ViT(nn.Module):
  """images [B, H, W, 3] -> tokens [B, (H/p)(W/p), width] (plus every block's output)."""

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  posemb: str = "sincos2d"  # or "learn"
  dtype: jnp.dtype = jnp.float32

  def embed(self, images):
    """Patch embedding plus position embedding: [B, T, width]."""
    # A dense layer on flattened patches, not a strided Conv: the same map, but its per-example
    # gradients stay matmuls. (vmapped Conv kernel gradients become grouped convolutions, which
    # XLA's SPMD partitioner got wrong on a batch-sharded mesh.)
    p = self.patch_size
    h, w = images.shape[1] // p, images.shape[2] // p
    patches = einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
    x = nn.Dense(self.width, dtype=self.dtype, name="embedding")(patches)
    c = self.width
    if self.posemb == "sincos2d":
      pos = jnp.asarray(sincos2d(h, w, c))
    elif self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(0.02), (h * w, c))
    else:
      raise ValueError(f"posemb={self.posemb!r} is unknown; use 'sincos2d' or 'learn'.")
    return x + pos.astype(x.dtype)[None]

  def encode(self, tokens, return_all_blocks: bool = False):
    """Runs the blocks on already embedded tokens [B, T, width]."""
    blocks = []
    for i in range(self.depth):
      tokens = EncoderBlock(self.num_heads, self.mlp_dim, self.qkv_bias, self.dtype,
                            name=f"block{i}")(tokens)
      blocks.append(tokens)
    out = nn.LayerNorm(dtype=self.dtype, name="norm")(tokens)
    return (out, blocks) if return_all_blocks else out

  @nn.compact
  def __call__(self, images, return_all_blocks: bool = False):
    return self.encode(self.embed(images), return_all_blocks)
