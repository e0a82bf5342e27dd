"""The ViT: shapes, kept tokens, position embeddings, the sincos tables, qkv biases, the class
token, the dense init and the GELU."""

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


def _param_shapes(model, *args):
  """The parameters `model.init` would create, as shapes (nothing is computed)."""
  return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def _shapes(model, *args):
  """{path: shape} of the parameters `model.init` would create."""
  tree = _param_shapes(model, *args)
  return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("cls_token, name", [("learn", "cls_token"),
                                             ("frozen", "frozen_cls_token")])
def test_the_class_token_adds_one_parameter_and_one_leading_token(cls_token, name):
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  base, with_cls = _vit("sincos2d"), _vit("sincos2d", cls_token=cls_token)
  base_shapes, cls_shapes = _shapes(base, images), _shapes(with_cls, images)
  assert set(cls_shapes.items()) - set(base_shapes.items()) == {(f"['{name}']", (16,))}
  assert set(base_shapes.items()) < set(cls_shapes.items())
  assert (base.num_prefix_tokens, with_cls.num_prefix_tokens) == (0, 1)
  assert vit_lib.is_frozen(("vit", name)) == (cls_token == "frozen")
  encoder = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, cls_token=cls_token)
  model, features = ViT(**encoder), vit_lib.vit_features(encoder)

  @jax.jit
  def run(key):
    params = model.init(key, images)["params"]
    out, blocks = model.apply({"params": params}, images, return_all_blocks=True)
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, images, keep=keep)))
    return out, blocks, features(dict(vit=params), images), jax.grad(loss)(params)

  keep = jnp.array([[0, 3, 5], [1, 2, 15]])
  assert jax.eval_shape(model.apply, {"params": _param_shapes(model, images)}, images,
                        keep=keep).shape == (2, 4, 16)  # [cls, 3 kept patches]
  out, blocks, (tokens, feats), grads = run(jax.random.key(0))
  assert out.shape == (2, 17, 16) and blocks[0].shape == (2, 17, 16)
  # `vit_features` (the evaluators' features) keeps the patch tokens only, cls or not.
  np.testing.assert_allclose(tokens, out[:, 1:], atol=1e-6)
  np.testing.assert_allclose(feats[0], blocks[0][:, 1:], atol=1e-6)
  assert feats[0].shape == (2, 16, 16)
  # A learnt token trains; a frozen one gets no gradient (`stop_gradient`), the rest does.
  assert bool(np.any(np.asarray(grads[name]))) == (cls_token == "learn")
  assert float(jnp.abs(grads["block0"]["mlp"]["fc1"]["kernel"]).max()) > 0
  with pytest.raises(ValueError):
    jax.eval_shape(_vit("sincos2d", cls_token="mean").init, jax.random.key(0), images)


def test_xavier_init_and_exact_gelu_change_values_not_the_tree():
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  vit = lambda **kw: ViT(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, **kw)

  @jax.jit
  def run(key):
    params = vit().init(key, images)["params"]
    xavier = vit(dense_init="xavier_uniform").init(key, images)["params"]
    outs = [vit(gelu=g).apply({"params": params}, images) for g in ("tanh", "exact")]
    return params, xavier, outs

  params, xavier, (out, exact) = run(jax.random.key(0))
  assert jax.tree.structure(xavier) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(xavier)):
    assert a.shape == b.shape
    if "kernel" in jax.tree_util.keystr(path):  # only the dense kernels are drawn otherwise
      assert not np.allclose(a, b)
    else:
      np.testing.assert_array_equal(a, b)
  fc1 = np.asarray(xavier["block0"]["mlp"]["fc1"]["kernel"])  # [16, 32]: U(-a, a)
  bound = np.sqrt(6 / (16 + 32))
  assert np.abs(fc1).max() <= bound and np.abs(fc1).max() > 0.9 * bound
  # Exact GELU: the same parameters, slightly different outputs (tanh approximation's error).
  assert 0 < float(jnp.abs(out - exact).max()) < 1e-2


def test_sincos1d_is_a_fixed_table_and_sincos2d_is_built_from_it():
  table = vit_lib.sincos1d(5, 8)
  assert table.shape == (5, 8) and table.dtype == np.float32
  np.testing.assert_allclose(table[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  np.testing.assert_allclose(table[3, [0, 4]], [np.sin(3), np.cos(3)], rtol=1e-6)
  grid = vit_lib.sincos2d(3, 4, 16)  # [sin-cos of the column x, of the row y]
  np.testing.assert_allclose(grid[4 * 2 + 3], np.concatenate(
      [vit_lib.sincos1d(4, 8)[3], vit_lib.sincos1d(3, 8)[2]]), atol=1e-7)
  prefixed = vit_lib.sincos2d_prefixed(3, 4, 16, 1)  # a zero row for the class token
  assert prefixed.shape == (13, 16) and not prefixed[0].any()
  np.testing.assert_array_equal(prefixed[1:], grid)
  with pytest.raises(ValueError):
    vit_lib.sincos1d(4, 7)
