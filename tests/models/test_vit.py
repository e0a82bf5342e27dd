"""The ViT: shapes, kept tokens, position embeddings, the sincos table, qkv biases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.models import vit as vit_lib
from dpvl.models.vit import ViT


def _vit(posemb, **kw):
  return ViT(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, posemb=posemb, **kw)


def _leaf_paths(tree):
  return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_vit_shapes():
  model = _vit("sincos2d")
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  apply = jax.jit(model.apply, static_argnames="return_all_blocks")
  out, blocks = apply({"params": params}, images, return_all_blocks=True)
  assert out.shape == (3, 16, 16) and len(blocks) == 2
  assert all(b.shape == (3, 16, 16) for b in blocks)
  # `keep` selects patch tokens after the position embedding: keeping all in order is a no-op.
  everything = jnp.broadcast_to(jnp.arange(16), (3, 16))
  np.testing.assert_allclose(apply({"params": params}, images, keep=everything), out,
                             atol=1e-5)
  assert apply({"params": params}, images, keep=everything[:, :5]).shape == (3, 5, 16)


@pytest.mark.parametrize("posemb, trained", [("sincos2d", False), ("learn", True)])
def test_position_embeddings_are_trained_only_when_learned(posemb, trained):
  shapes = jax.eval_shape(_vit(posemb).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert any("pos_embedding" in p for p in _leaf_paths(shapes)) == trained
  with pytest.raises(ValueError):
    jax.eval_shape(_vit("none").init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_sincos2d_is_a_fixed_table():
  table = vit_lib.sincos2d(3, 4, 8)
  assert table.shape == (12, 8) and table.dtype == np.float32
  np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # position (0, 0)
  assert len({tuple(row) for row in np.round(table, 5)}) == 12  # every position differs
  with pytest.raises(ValueError):
    vit_lib.sincos2d(2, 2, 6)


def test_qkv_bias_drops_only_the_query_key_value_biases():
  images = jnp.zeros((1, 8, 8, 3))
  paths = lambda model: _leaf_paths(jax.eval_shape(model.init, jax.random.key(0), images))
  with_bias, without = paths(_vit("sincos2d")), paths(_vit("sincos2d", qkv_bias=False))
  dropped = with_bias - without
  assert without < with_bias and len(dropped) == 6  # query/key/value bias x 2 blocks
  assert all(any(n in p for n in ("query", "key", "value")) and "bias" in p for p in dropped)
