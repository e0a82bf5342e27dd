"""The captioner: a bridge between the encoder's and the decoder's widths."""

import jax
import jax.numpy as jnp

from dpvl.models.captioner import Captioner


def test_captioner_bridges_the_widths():
  model = Captioner(
      encoder=dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, qkv_bias=False),
      decoder=dict(vocab_size=20, max_len=6, width=24, depth=1, num_heads=2, mlp_dim=32))
  images, tokens = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 6), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
  assert params["bridge"]["kernel"].shape == (16, 24) and "bias" not in params["bridge"]
  assert jax.eval_shape(model.apply, {"params": params}, images, tokens).shape == (2, 6, 20)
  hash(model)  # hashable: a static argument of jit
