"""The captioner: a bridge between the encoder's and the decoder's widths, DP-Cap's options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.models import vit as vit_lib
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


def test_dpcap_bridge_bias_memory_positions_and_class_token():
  encoder = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, qkv_bias=False)
  decoder = dict(vocab_size=20, max_len=6, width=24, depth=1, num_heads=2, mlp_dim=32)
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  tokens = jnp.zeros((2, 6), jnp.int32)

  def shapes(model):
    tree = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
    return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}

  base = Captioner(encoder=encoder, decoder=decoder)
  dpcap = Captioner(encoder=dict(encoder, cls_token="frozen"), decoder=decoder, bridge_bias=True,
                    memory_posemb="sincos2d")
  # The bias and the class token are the only new parameters; the positions are a constant.
  assert set(shapes(dpcap).items()) - set(shapes(base).items()) == {
      ("['bridge']['bias']", (24,)), ("['vit']['frozen_cls_token']", (16,))}
  assert set(shapes(base)) < set(shapes(dpcap))
  no_posemb = dpcap.clone(memory_posemb="none")

  @jax.jit
  def memories(key):
    params = dpcap.init(key, images, tokens)
    return [m.apply(params, images, method=Captioner.encode_images) for m in (dpcap, no_posemb)]

  with_pos, without = memories(jax.random.key(0))
  assert with_pos.shape == (2, 1 + 4, 24)  # the class token, then the 2 x 2 patches
  # The memory's position embeddings: zero on the class token, 2-D sin-cos on the patches.
  np.testing.assert_allclose(with_pos - without, np.broadcast_to(
      vit_lib.sincos2d_prefixed(2, 2, 24, 1), (2, 5, 24)), atol=1e-5)
  with pytest.raises(ValueError):
    jax.eval_shape(base.clone(memory_posemb="learn").init, jax.random.key(0), images, tokens)
