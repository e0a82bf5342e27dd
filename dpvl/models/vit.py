"""Vision Transformer encoder, shared by every objective (MAE, captioning, CLIP).

Pre-LN blocks, nothing that mixes examples (no BatchNorm, no dropout): it runs under
per-example `vmap` for DP-SGD. Fixed 2-D sin-cos position embeddings are a constant, not a
parameter, so no optimizer step can change them.

Layout options (defaults first; the papers' configs set the others):
* `cls_token`: "none" (pool the patch tokens later), "learn" (MAE and ViP: a learnt token
  prepended to the patches, with a zero position embedding) or "frozen" (DP-Cap: the same token
  kept at its initial value). A frozen token is the parameter `frozen_cls_token`, read through
  `jax.lax.stop_gradient`; `is_frozen` names it, so that the optimizer drops its updates too
  (`dpvl.objectives.keep_frozen`).
* `dense_init`: "lecun" (Flax's default) or "xavier_uniform" (MAE, timm and DP-Cap).
* `gelu`: "tanh" (Flax's default approximation) or "exact" (PyTorch's `nn.GELU`, timm).

Mixed precision: parameters are float32; `dtype` is the activation (compute) dtype. Attention
logits and softmax are float32 whatever `dtype` is, and LayerNorm statistics too.
"""

from typing import Any, Callable, ClassVar, Mapping, Sequence

import einops
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DENSE_INITS = {"lecun": nn.initializers.lecun_normal(),
               "xavier_uniform": nn.initializers.xavier_uniform()}
GELUS = {"tanh": lambda x: nn.gelu(x, approximate=True),
         "exact": lambda x: nn.gelu(x, approximate=False)}
CLS_TOKENS = ("none", "learn", "frozen")
FROZEN_PREFIX = "frozen_"  # parameters named so keep their initial value (`is_frozen`)


def _choice(table: Mapping[str, Any], name: str, what: str):
  if name not in table:
    raise ValueError(f"{what}={name!r} is unknown; use " + " or ".join(map(repr, table)) + ".")
  return table[name]


def dense_init(name: str) -> Callable:
  """The kernel initializer `name` of `DENSE_INITS`; ValueError for an unknown name."""
  return _choice(DENSE_INITS, name, "dense_init")


def gelu(name: str) -> Callable:
  """The GELU `name` of `GELUS`; ValueError for an unknown name."""
  return _choice(GELUS, name, "gelu")


def is_frozen(path: Sequence[str]) -> bool:
  """Whether the parameter at `path` (its keys, e.g. ("vit", "frozen_cls_token")) is frozen:
  the modules read it through `stop_gradient` and it must keep its initial value."""
  return bool(path) and str(path[-1]).startswith(FROZEN_PREFIX)


def _sincos(positions, dim: int, temperature: float) -> np.ndarray:
  """float64 [len(positions), dim]: [sin(p w), cos(p w)], dim / 2 frequencies w."""
  omega = 1.0 / temperature ** (np.arange(dim // 2) / (dim // 2))
  angles = np.reshape(positions, (-1, 1)) * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos1d(length: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 1-D sin-cos position embeddings, float32 [length, dim] (DP-Cap's text positions).

  Args:
    length: positions 0 .. length - 1.
    dim: the embedding's width; even.
    temperature: the longest wavelength's scale.

  Returns:
    float32 [length, dim]: columns [sin(t w), cos(t w)], dim / 2 frequencies w each.

  Raises:
    ValueError: if `dim` is odd.
  """
  if dim % 2:
    raise ValueError(f"1-D sin-cos position embeddings need an even width, got {dim}.")
  return _sincos(np.arange(length), dim, temperature).astype(np.float32)


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
  return np.concatenate([_sincos(x, dim // 2, temperature), _sincos(y, dim // 2, temperature)],
                        axis=1).astype(np.float32)


def sincos2d_prefixed(height: int, width: int, dim: int, prefix: int) -> np.ndarray:
  """`sincos2d` with `prefix` zero rows first (the class token's slot, as MAE): float32
  [prefix + height * width, dim]."""
  return np.concatenate([np.zeros((prefix, dim), np.float32), sincos2d(height, width, dim)])


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
  dense_init: str = "lecun"

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
    heads = (self.num_heads, width // self.num_heads)
    init = dense_init(self.dense_init)
    proj = lambda name: nn.DenseGeneral(heads, use_bias=self.qkv_bias, kernel_init=init,
                                        dtype=self.dtype, name=name)
    q, k, v = proj("query")(x), proj("key")(context), proj("value")(context)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # float32 softmax
    return nn.DenseGeneral(width, axis=(-2, -1), use_bias=self.out_bias, kernel_init=init,
                           dtype=self.dtype, name="out")(y)


class Mlp(nn.Module):
  """Dense -> GELU -> Dense back to the input width."""

  hidden: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  dense_init: str = "lecun"
  gelu: str = "tanh"

  @nn.compact
  def __call__(self, x):
    out = x.shape[-1]
    dense = lambda width, name: nn.Dense(width, use_bias=self.use_bias,
                                         kernel_init=dense_init(self.dense_init),
                                         dtype=self.dtype, name=name)
    return dense(out, "fc2")(gelu(self.gelu)(dense(self.hidden, "fc1")(x)))


class EncoderBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  causal: bool = False
  dense_init: str = "lecun"
  gelu: str = "tanh"

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
    x = x + Attention(self.num_heads, qkv_bias=self.qkv_bias, causal=self.causal,
                      dense_init=self.dense_init, dtype=self.dtype, name="attention")(y)
    y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
    return x + Mlp(self.mlp_dim, dense_init=self.dense_init, gelu=self.gelu, dtype=self.dtype,
                   name="mlp")(y)


class ViT(nn.Module):
  """images [B, H, W, 3] -> tokens [B, P + (H/p)(W/p), width] (plus every block's output).

  P = `num_prefix_tokens`: 1 (the class token, first) with a class token, else 0.
  """

  # Values a string field takes, checked at build (`dpvl.objectives.check_transformer`).
  CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {
      "posemb": ("sincos2d", "learn"), "cls_token": CLS_TOKENS,
      "dense_init": tuple(DENSE_INITS), "gelu": tuple(GELUS)}

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  posemb: str = "sincos2d"  # or "learn"
  cls_token: str = "none"  # or "learn", "frozen"
  dense_init: str = "lecun"  # or "xavier_uniform"
  gelu: str = "tanh"  # or "exact"
  dtype: jnp.dtype = jnp.float32

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens in the output: 1 with a class token, else 0."""
    if self.cls_token not in CLS_TOKENS:
      raise ValueError(f"cls_token={self.cls_token!r} is unknown; use 'none', 'learn' or "
                       "'frozen'.")
    return int(self.cls_token != "none")

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
    x = nn.Dense(self.width, kernel_init=dense_init(self.dense_init), dtype=self.dtype,
                 name="embedding")(patchify(images, p))
    c = self.width
    if self.posemb == "sincos2d":
      pos = jnp.asarray(sincos2d(h, w, c))
    elif self.posemb == "learn":
      pos = self.param("pos_embedding", nn.initializers.normal(0.02), (h * w, c))
    else:
      raise ValueError(f"posemb={self.posemb!r} is unknown; use 'sincos2d' or 'learn'.")
    return x + pos.astype(x.dtype)[None]

  def _prepend_cls(self, tokens):
    """[B, T, width] -> [B, P + T, width]: the class token first (its position embedding is
    zero, as MAE's)."""
    if not self.num_prefix_tokens:
      return tokens
    init = nn.initializers.normal(0.02)  # MAE's and DP-Cap's
    if self.cls_token == "learn":
      cls = self.param("cls_token", init, (self.width,))
    else:  # "frozen": its gradient is zero, and `is_frozen` names it for the optimizer
      cls = jax.lax.stop_gradient(self.param(FROZEN_PREFIX + "cls_token", init, (self.width,)))
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
    return jnp.concatenate([cls, tokens], axis=1)

  @nn.compact
  def __call__(self, images, return_all_blocks: bool = False, keep=None):
    """Encodes images [B, H, W, 3].

    Args:
      images: float [B, H, W, 3], H and W multiples of `patch_size`.
      return_all_blocks: also return the list of every block's output [B, P + T, width]
        (before the final LayerNorm), for linear probes.
      keep: optional int [B, K]: indices (row-major patch order) of the patch tokens to encode,
        after the position embedding is added (MAE's visible patches). None encodes all.

    Returns:
      tokens [B, P + (T or K), width] after the final LayerNorm, the class token first when
      there is one (and the block outputs if asked).
    """
    tokens = self._embed(images)
    if keep is not None:
      tokens = jnp.take_along_axis(tokens, keep[..., None], axis=1)
    tokens = self._prepend_cls(tokens)
    blocks = []
    for i in range(self.depth):
      tokens = EncoderBlock(self.num_heads, self.mlp_dim, self.qkv_bias, self.dtype,
                            dense_init=self.dense_init, gelu=self.gelu, name=f"block{i}")(tokens)
      blocks.append(tokens)
    out = nn.LayerNorm(dtype=self.dtype, name="norm")(tokens)
    return (out, blocks) if return_all_blocks else out


def vit_features(encoder: Mapping[str, Any], dtype=jnp.float32):
  """encode(params, images) -> (tokens, blocks) of the ViT stored under `params["vit"]`.

  Every dpvl model that holds an image encoder names it "vit", so evaluators read the same
  features from any objective's parameters. The patch tokens only: a class token is dropped,
  so pooling them means the same with or without one.
  """
  vit = ViT(**encoder, dtype=dtype)
  skip = vit.num_prefix_tokens

  def encode(params, images):
    out, blocks = vit.apply({"params": params["vit"]}, images, return_all_blocks=True)
    return out[:, skip:], [b[:, skip:] for b in blocks]

  return encode
