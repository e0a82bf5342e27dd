"""Causal text decoder with cross-attention to a memory of image tokens (DP-Cap's decoder).

Pre-LN blocks: causal self-attention, cross-attention to the memory, GELU MLP. Linear layers are
bias-free by default (DP-Cap). Activations use `dtype`; the logits head runs in float32.
"""

from flax import linen as nn
import jax.numpy as jnp

from dpvl.models.vit import Attention
from dpvl.models.vit import Mlp


def embed_tokens(module: nn.Module, tokens, what: str):
  """Token plus learnt position embeddings [B, L, width] in `module.dtype`, created as
  `module`'s parameters `token_embedding` and `pos_embedding` (call from its compact method).
  `module` has `vocab_size`, `max_len`, `width` and `dtype`; `what` names it in the error.

  Args:
    module: the Flax module whose compact method calls this; the parameters are its own.
    tokens: int [B, L] token ids, L <= `module.max_len`.
    what: the module's name in the error message, e.g. "decoder".

  Returns:
    [B, L, width] embeddings in `module.dtype`.

  Raises:
    ValueError: if L exceeds `module.max_len`.
  """
  length = tokens.shape[1]
  if length > module.max_len:
    raise ValueError(f"{length} tokens exceed the {what}'s max_len {module.max_len}.")
  x = nn.Embed(module.vocab_size, module.width, name="token_embedding")(tokens)
  pos = module.param("pos_embedding", nn.initializers.normal(0.02),
                     (module.max_len, module.width))
  return (x + pos[None, :length]).astype(module.dtype)


class DecoderBlock(nn.Module):
  """x + causal MHSA(LN(x)); x + cross-attention(LN(x), memory); x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory):
    attention = lambda name, causal: Attention(
        self.num_heads, qkv_bias=self.use_bias, out_bias=self.use_bias, causal=causal,
        dtype=self.dtype, name=name)
    y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
    x = x + attention("self_attention", True)(y)
    y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
    x = x + attention("cross_attention", False)(y, memory)
    y = nn.LayerNorm(dtype=self.dtype, name="norm3")(x)
    return x + Mlp(self.mlp_dim, use_bias=self.use_bias, dtype=self.dtype, name="mlp")(y)


class TextDecoder(nn.Module):
  """tokens [B, L], memory [B, T, D] -> float32 logits [B, L, vocab_size].

  Position t attends to tokens <= t only, and to every memory token. L <= max_len.
  """

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
    x = embed_tokens(self, tokens, "decoder")
    memory = memory.astype(self.dtype)
    for i in range(self.depth):
      x = DecoderBlock(self.num_heads, self.mlp_dim, self.use_bias, self.dtype,
                       name=f"block{i}")(x, memory)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    # Logits in float32: bfloat16 logits would round the loss's inputs to ~3 significant digits.
    return nn.Dense(self.vocab_size, use_bias=self.use_bias, dtype=jnp.float32,
                    name="head")(x.astype(jnp.float32))
