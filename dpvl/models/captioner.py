"""DP-Cap's captioner: ViT encoder -> linear bridge -> causal text decoder."""

from typing import Any, ClassVar, Mapping

from flax import linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from dpvl.models import vit as vit_lib
from dpvl.models.text import TextDecoder
from dpvl.models.vit import ViT


class Captioner(nn.Module):
  """(images [B, H, W, 3], tokens [B, L]) -> float32 next-token logits [B, L, vocab].

  The memory the decoder reads is bridge(ViT tokens), the class token included when the
  encoder has one, plus (`memory_posemb="sincos2d"`, DP-Cap) fixed 2-D sin-cos position
  embeddings of the decoder's width, zero on the class token.

  Attributes:
    encoder: `ViT` keyword arguments (patch_size, width, depth, num_heads, mlp_dim, ...).
    decoder: `TextDecoder` keyword arguments (vocab_size, max_len, width, depth, ...); its
      `dense_init` also initializes the bridge.
    dtype: activation dtype of both towers (parameters stay float32).
    bridge_bias: the bridge has a bias (DP-Cap) or not.
    memory_posemb: "none" or "sincos2d".
  """

  MEMORY_POSEMBS: ClassVar[tuple[str, ...]] = ("none", "sincos2d")

  encoder: Mapping[str, Any]
  decoder: Mapping[str, Any]
  dtype: jnp.dtype = jnp.float32
  bridge_bias: bool = False
  memory_posemb: str = "none"

  def __post_init__(self):
    # Frozen, so that the module hashes (a static argument of `jax.jit`).
    object.__setattr__(self, "encoder", FrozenDict(self.encoder))
    object.__setattr__(self, "decoder", FrozenDict(self.decoder))
    super().__post_init__()

  def setup(self):
    if self.memory_posemb not in self.MEMORY_POSEMBS:
      raise ValueError(f"memory_posemb={self.memory_posemb!r} is unknown; use 'none' or "
                       "'sincos2d'.")
    self.vit = ViT(**self.encoder, dtype=self.dtype)
    init = vit_lib.dense_init(self.decoder.get("dense_init", "lecun"))
    self.bridge = nn.Dense(self.decoder["width"], use_bias=self.bridge_bias, kernel_init=init,
                           dtype=self.dtype)
    self.text = TextDecoder(**self.decoder, dtype=self.dtype)

  def encode_images(self, images):
    """The memory: image tokens mapped to the decoder's width, [B, P + T, decoder width]."""
    memory = self.bridge(self.vit(images))
    if self.memory_posemb == "sincos2d":
      p = self.encoder["patch_size"]
      pos = vit_lib.sincos2d_prefixed(images.shape[1] // p, images.shape[2] // p,
                                      self.decoder["width"], self.vit.num_prefix_tokens)
      memory = memory + jnp.asarray(pos).astype(memory.dtype)[None]
    return memory

  def decode(self, tokens, memory):
    """Logits [B, L, vocab] of tokens [B, L] given a memory from `encode_images`."""
    return self.text(tokens, memory)

  def __call__(self, images, tokens):
    return self.decode(tokens, self.encode_images(images))
