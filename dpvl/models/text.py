"""Causal text decoder with cross-attention to a memory of image tokens (DP-Cap's decoder).

Blocks: causal self-attention, cross-attention to the memory, GELU MLP. Linear layers are
bias-free by default (DP-Cap). Activations use `dtype`; the logits head runs in float32.

Layout options (defaults first; `configs/dpcap_laion233m.py` sets DP-Cap's published ones):
* `layout`: "pre_ln" (x + f(LN(x)) sub-layers, a final LayerNorm, a head without bias) or
  "post_ln" (DP-Cap: LN(x + f(x)) sub-layers, no final norm, a head of LayerNorm + linear with
  bias).
* `posemb`: "learn" (a learnt table) or "sincos1d" (fixed 1-D sin-cos, no parameter; DP-Cap).
* `dense_init`, `gelu`: as the ViT's (`dpvl.models.vit`).
* `embed_init`: the token embedding's "fan_in" (Flax's default, std 1/sqrt(width)) or
  "unit_normal" (N(0, 1): PyTorch's `nn.Embedding`, as DP-Cap).
"""

from typing import ClassVar, Mapping

from flax import linen as nn
import jax.numpy as jnp

from dpvl.models import vit as vit_lib
from dpvl.models.vit import Attention
from dpvl.models.vit import Mlp

EMBED_INITS = {"fan_in": nn.linear.default_embed_init,
               "unit_normal": nn.initializers.normal(1.0)}
LAYOUTS = ("pre_ln", "post_ln")


def embed_tokens(module: nn.Module, tokens, what: str, posemb: str = "learn",
                 embed_init: str = "fan_in"):
  """Token plus position embeddings [B, L, width] in `module.dtype`, created as `module`'s
  parameters `token_embedding` and (learnt) `pos_embedding` (call from its compact method).
  `module` has `vocab_size`, `max_len`, `width` and `dtype`; `what` names it in the error.

  Args:
    module: the Flax module whose compact method calls this; the parameters are its own.
    tokens: int [B, L] token ids, L <= `module.max_len`.
    what: the module's name in the error message, e.g. "decoder".
    posemb: "learn" (a parameter [max_len, width]) or "sincos1d" (a fixed table).
    embed_init: a key of `EMBED_INITS`, the token embedding's initializer.

  Returns:
    [B, L, width] embeddings in `module.dtype`.

  Raises:
    ValueError: if L exceeds `module.max_len`, or for an unknown option.
  """
  length = tokens.shape[1]
  if length > module.max_len:
    raise ValueError(f"{length} tokens exceed the {what}'s max_len {module.max_len}.")
  if embed_init not in EMBED_INITS:
    raise ValueError(f"embed_init={embed_init!r} is unknown; use 'fan_in' or 'unit_normal'.")
  x = nn.Embed(module.vocab_size, module.width, embedding_init=EMBED_INITS[embed_init],
               name="token_embedding")(tokens)
  if posemb == "learn":
    pos = module.param("pos_embedding", nn.initializers.normal(0.02),
                       (module.max_len, module.width))
  elif posemb == "sincos1d":
    pos = jnp.asarray(vit_lib.sincos1d(module.max_len, module.width))
  else:
    raise ValueError(f"posemb={posemb!r} is unknown; use 'learn' or 'sincos1d'.")
  return (x + pos[None, :length]).astype(module.dtype)


class DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention to the memory, MLP; each sub-layer f as
  x + f(LN(x)) ("pre_ln") or LN(x + f(x)) ("post_ln")."""

  num_heads: int
  mlp_dim: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  layout: str = "pre_ln"
  dense_init: str = "lecun"
  gelu: str = "tanh"

  @nn.compact
  def __call__(self, x, memory):
    attention = lambda name, causal: Attention(
        self.num_heads, qkv_bias=self.use_bias, out_bias=self.use_bias, causal=causal,
        dtype=self.dtype, dense_init=self.dense_init, name=name)
    sublayers = [
        attention("self_attention", True),
        lambda y: attention("cross_attention", False)(y, memory),
        Mlp(self.mlp_dim, use_bias=self.use_bias, dtype=self.dtype, dense_init=self.dense_init,
            gelu=self.gelu, name="mlp")]
    for i, sublayer in enumerate(sublayers, start=1):
      norm = nn.LayerNorm(dtype=self.dtype, name=f"norm{i}")
      if self.layout == "pre_ln":
        x = x + sublayer(norm(x))
      elif self.layout == "post_ln":
        x = norm(x + sublayer(x))
      else:
        raise ValueError(f"layout={self.layout!r} is unknown; use 'pre_ln' or 'post_ln'.")
    return x


class TextDecoder(nn.Module):
  """tokens [B, L], memory [B, T, D] -> float32 logits [B, L, vocab_size].

  Position t attends to tokens <= t only, and to every memory token. L <= max_len.
  """

  # Values a string field takes, checked at build (`dpvl.objectives.check_transformer`).
  CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {
      "layout": LAYOUTS, "posemb": ("learn", "sincos1d"),
      "dense_init": tuple(vit_lib.DENSE_INITS), "gelu": tuple(vit_lib.GELUS),
      "embed_init": tuple(EMBED_INITS)}

  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  layout: str = "pre_ln"  # or "post_ln"
  posemb: str = "learn"  # or "sincos1d"
  dense_init: str = "lecun"  # or "xavier_uniform"
  gelu: str = "tanh"  # or "exact"
  embed_init: str = "fan_in"  # or "unit_normal"

  @nn.compact
  def __call__(self, tokens, memory):
    x = embed_tokens(self, tokens, "decoder", self.posemb, self.embed_init)
    memory = memory.astype(self.dtype)
    for i in range(self.depth):
      x = DecoderBlock(self.num_heads, self.mlp_dim, self.use_bias, self.dtype, self.layout,
                       self.dense_init, self.gelu, name=f"block{i}")(x, memory)
    # Pre-LN: the final norm, a head without bias. Post-LN: every block ends with a norm; the
    # head is its own LayerNorm and a linear map with bias (DP-Cap's).
    post = self.layout == "post_ln"
    x = nn.LayerNorm(dtype=self.dtype, name="head_norm" if post else "norm")(x)
    # Logits in float32: bfloat16 logits would round the loss's inputs to ~3 significant digits.
    return nn.Dense(self.vocab_size, use_bias=post or self.use_bias,
                    kernel_init=vit_lib.dense_init(self.dense_init), dtype=jnp.float32,
                    name="head")(x.astype(jnp.float32))
