"""The text decoder: bias-free, causal, reading the memory; its post-LN layout, fixed
positions and token embedding init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.models.text import TextDecoder


def _leaf_paths(tree):
  return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _decoder():
  return TextDecoder(vocab_size=20, max_len=8, width=16, depth=2, num_heads=2, mlp_dim=32)


def test_decoder_is_causal_and_reads_the_memory():
  model = _decoder()
  tokens = jnp.array([[1, 5, 6, 7, 8, 9, 2, 0]])
  memory = jax.random.normal(jax.random.key(1), (1, 4, 16))
  params = jax.jit(model.init)(jax.random.key(0), tokens, memory)["params"]
  assert not any("bias" in p for p in _leaf_paths(params) if "norm" not in p)  # bias-free
  apply = jax.jit(model.apply)
  base = apply({"params": params}, tokens, memory)
  assert base.shape == (1, 8, 20) and base.dtype == jnp.float32
  for t in range(8):
    changed = apply({"params": params}, tokens.at[0, t].set(11), memory)
    np.testing.assert_allclose(base[0, :t], changed[0, :t], atol=1e-6)
    assert not np.allclose(base[0, t:], changed[0, t:])
  other_memory = apply({"params": params}, tokens, memory + 1.0)
  assert not np.allclose(base, other_memory)
  with pytest.raises(ValueError):
    jax.eval_shape(model.apply, {"params": params}, jnp.zeros((1, 9), jnp.int32), memory)


def _shapes(model, *args):
  tree = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_post_ln_layout_has_no_final_norm_and_a_norm_and_bias_head():
  tokens, memory = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 4, 16))
  pre = _shapes(_decoder(), tokens, memory)
  post_model = TextDecoder(vocab_size=20, max_len=8, width=16, depth=2, num_heads=2, mlp_dim=32,
                           layout="post_ln")
  post = _shapes(post_model, tokens, memory)
  # The blocks keep their parameters (post-LN moves the norms, not their number).
  assert {k: v for k, v in pre.items() if "block" in k} == {
      k: v for k, v in post.items() if "block" in k}
  assert set(pre.items()) - set(post.items()) == {("['norm']['bias']", (16,)),
                                                  ("['norm']['scale']", (16,))}
  assert set(post.items()) - set(pre.items()) == {
      ("['head_norm']['bias']", (16,)), ("['head_norm']['scale']", (16,)),
      ("['head']['bias']", (20,))}
  # Post-LN: every block's output is LayerNorm'ed (zero mean, unit variance per token).
  one_block = post_model.clone(depth=1)

  @jax.jit
  def block_output(key):
    params = one_block.init(key, tokens, memory)["params"]
    _, state = one_block.apply({"params": params}, tokens + 3, memory + 1.0,
                               capture_intermediates=lambda m, _: m.name == "block0")
    return state["intermediates"]["block0"]["__call__"][0]

  out = block_output(jax.random.key(0))
  np.testing.assert_allclose(out.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(out.std(-1), 1, atol=1e-2)
  with pytest.raises(ValueError):
    jax.eval_shape(TextDecoder(vocab_size=20, max_len=8, width=16, depth=1, num_heads=2,
                               mlp_dim=32, layout="sandwich").init,
                   jax.random.key(0), tokens, memory)


def test_sincos1d_positions_are_fixed_and_unit_normal_embeddings():
  tokens, memory = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 4, 16))
  model = TextDecoder(vocab_size=20, max_len=8, width=16, depth=1, num_heads=2, mlp_dim=32,
                      posemb="sincos1d", embed_init="unit_normal")
  shapes = _shapes(model, tokens, memory)
  learn = _shapes(TextDecoder(vocab_size=20, max_len=8, width=16, depth=1, num_heads=2,
                              mlp_dim=32), tokens, memory)
  assert set(learn.items()) - set(shapes.items()) == {("['pos_embedding']", (8, 16))}
  assert set(shapes) < set(learn)  # nothing added: the table is a constant
  embedding = jax.jit(model.init)(jax.random.key(0), tokens, memory)["params"][
      "token_embedding"]
  assert 0.7 < float(jnp.std(embedding["embedding"])) < 1.3  # N(0, 1), as PyTorch's
