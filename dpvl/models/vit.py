"""Vision Transformer encoder, shared by every objective (MAE, captioning, CLIP).

Pre-LN blocks, no class token (pool later), nothing that mixes examples (no BatchNorm, no
dropout): it runs under per-example `vmap` for DP-SGD. Fixed 2-D sin-cos position embeddings
are a constant, not a parameter, so no optimizer step can change them.

Mixed precision: parameters are float32; `dtype` is the activation (compute) dtype. Attention
logits and softmax are float32 whatever `dtype` is, and LayerNorm statistics too.
"""

from typing import Any, Mapping

import einops
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sincos2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings, float32 [height * width, dim] (MAE's recipe).

  Args:
    height: rows of the patch grid.
    width: columns of the patch grid.
    dim: the embedding's width; a multiple of 4.
    temperature: the longest wavelength's scale (10,000 in MAE).

  Returns:
    float32 [height * width, dim], rows in row-major patch order (as `patchify`); columns
    [sin(x), cos(x), sin(y), cos(y)], dim / 4 frequencies each, x the column and y the row.

  Raises:
    ValueError: if `dim` is not a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}.")
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))
  y = y.reshape(-1, 1) * omega[None]
  x = x.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def patchify(images, patch_size: int):
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]: the row-major patch order of every ViT token."""
  p = patch_size
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


class Attention(nn.Module):
  """Multi-head attention of x [B, L, D] over `context` [B, S, D] (x itself when None).

  `qkv_bias` switches the query/key/value biases only (timm's `qkv_bias`); `out_bias` the output
  projection's. `causal` masks position i from every key j > i (self-attention only).
  """

  num_heads: int
  qkv_bias: bool = True
  out_bias: bool = True
  causal: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
    heads = (self.num_heads, width // self.num_heads)
    proj = lambda name: nn.DenseGeneral(heads, use_bias=self.qkv_bias, dtype=self.dtype,
                                        name=name)
    q, k, v = proj("query")(x), proj("key")(context), proj("value")(context)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # float32 softmax
    return nn.DenseGeneral(width, axis=(-2, -1), use_bias=self.out_bias, dtype=self.dtype,
                           name="out")(y)


class Mlp(nn.Module):
  """Dense -> GELU -> Dense back to the input width."""

  hidden: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = x.shape[-1]
    x = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    return nn.Dense(out, use_bias=self.use_bias, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
    x = x + Attention(self.num_heads, qkv_bias=self.qkv_bias, causal=self.causal,
                      dtype=self.dtype, name="attention")(y)
    y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
    return x + Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


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

  def _embed(self, images):
    """Patch embedding plus position embedding: [B, T, width]."""
    # A dense layer on flattened patches, not a strided Conv: the same map, but its per-example
    # gradients stay matmuls. (vmapped Conv kernel gradients become grouped convolutions, which
    # XLA's SPMD partitioner got wrong on a batch-sharded mesh.)
    p = self.patch_size
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"expected images [B, H, W, C] with H and W multiples of the patch size "
                       f"{p}, got shape {images.shape}.")
    h, w = images.shape[1] // p, images.shape[2] // p
    x = nn.Dense(self.width, dtype=self.dtype, name="embedding")(patchify(images, p))
    c = self.width
    if self.posemb == "sincos2d":
      pos = jnp.asarray(sincos2d(h, w, c))
    elif self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(0.02), (h * w, c))
    else:
      raise ValueError(f"posemb={self.posemb!r} is unknown; use 'sincos2d' or 'learn'.")
    return x + pos.astype(x.dtype)[None]

  @nn.compact
  def __call__(self, images, return_all_blocks: bool = False, keep=None):
    """Encodes images [B, H, W, 3].

    Args:
      images: float [B, H, W, 3], H and W multiples of `patch_size`.
      return_all_blocks: also return the list of every block's output [B, T, width] (before
        the final LayerNorm), for linear probes.
      keep: optional int [B, K]: indices (row-major patch order) of the patch tokens to encode,
        after the position embedding is added (MAE's visible patches). None encodes all.

    Returns:
      tokens [B, T or K, width] after the final LayerNorm (and the block outputs if asked).
    """
    tokens = self._embed(images)
    if keep is not None:
      tokens = jnp.take_along_axis(tokens, keep[..., None], axis=1)
    blocks = []
    for i in range(self.depth):
      tokens = EncoderBlock(self.num_heads, self.mlp_dim, self.qkv_bias, self.dtype,
                            name=f"block{i}")(tokens)
      blocks.append(tokens)
    out = nn.LayerNorm(dtype=self.dtype, name="norm")(tokens)
    return (out, blocks) if return_all_blocks else out


def vit_features(encoder: Mapping[str, Any], dtype=jnp.float32):
  """encode(params, images) -> (tokens, blocks) of the ViT stored under `params["vit"]`.

  Every dpvl model that holds an image encoder names it "vit", so evaluators read the same
  features from any objective's parameters.
  """
  vit = ViT(**encoder, dtype=dtype)

  def encode(params, images):
    return vit.apply({"params": params["vit"]}, images, return_all_blocks=True)

  return encode
