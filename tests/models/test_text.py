"""The text decoder: bias-free, causal, and reading the memory."""

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
