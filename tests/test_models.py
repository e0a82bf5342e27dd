"""ViT, text decoder, captioner and the DP-Cap per-example loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_dpcap_config
from configs import dpcap_laion233m
from dpvl.data import sources
from dpvl.models.text import TextDecoder
from dpvl.models.vit import ViT
from dpvl.objectives import build_objective
from dpvl.objectives import dpcap
from dpvl.privacy import clipping


def _vit(posemb):
  return ViT(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, posemb=posemb)


@pytest.mark.parametrize("posemb, trained", [("sincos2d", False), ("learn", True)])
def test_vit_shapes_and_position_embeddings(posemb, trained):
  model = _vit(posemb)
  images = jnp.ones((3, 16, 16, 3))
  params = model.init(jax.random.key(0), images)["params"]
  out, blocks = model.apply({"params": params}, images, return_all_blocks=True)
  assert out.shape == (3, 16, 16) and len(blocks) == 2
  assert ("pos_embedding" in params) == trained


def _decoder():
  return TextDecoder(vocab_size=20, max_len=8, width=16, depth=2, num_heads=2, mlp_dim=32)


def test_decoder_is_causal_and_reads_the_memory():
  model = _decoder()
  tokens = jnp.array([[1, 5, 6, 7, 8, 9, 2, 0]])
  memory = jax.random.normal(jax.random.key(1), (1, 4, 16))
  params = model.init(jax.random.key(0), tokens, memory)["params"]
  base = model.apply({"params": params}, tokens, memory)
  changed = model.apply({"params": params}, tokens.at[0, 4].set(11), memory)
  np.testing.assert_allclose(base[0, :4], changed[0, :4], atol=1e-6)
  assert not np.allclose(base[0, 4:], changed[0, 4:])
  other_image = model.apply({"params": params}, tokens, memory + 1.0)
  assert not np.allclose(base, other_image)


def test_masked_token_loss_ignores_padding():
  logits = jax.random.normal(jax.random.key(0), (5, 7))
  targets = jnp.array([3, 4, 2, 0, 0])
  got = dpcap.masked_token_loss(logits, targets, pad_id=0)
  logp = jax.nn.log_softmax(logits)
  want = -(logp[0, 3] + logp[1, 4] + logp[2, 2]) / 3
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Garbage logits at padded positions change nothing.
  np.testing.assert_allclose(
      dpcap.masked_token_loss(logits.at[3:].set(100.0), targets, 0), got, rtol=1e-6)


@pytest.fixture(scope="module")
def small_objective():
  config = small_dpcap_config()
  objective = build_objective(config)
  params = objective.init(jax.random.key(0))
  source = sources.build_source(config.data)
  examples = [objective.prepare(source[i]) for i in range(6)]
  batch = {k: jnp.stack([e[k] for e in examples]) for k in examples[0]}
  return config, objective, params, batch


def test_dpcap_loss_is_finite_for_an_empty_caption(small_objective):
  _, objective, params, batch = small_objective
  record = dict(image=np.zeros((16, 16, 3), np.uint8), caption="")
  example = objective.prepare(record)
  loss = objective.per_example_loss(params, example, jax.random.key(0))
  assert np.isfinite(loss)


def test_dpcap_per_example_grads_match_a_loop(small_objective):
  _, objective, params, batch = small_objective
  rngs = jax.random.split(jax.random.key(0), 6)
  losses, grads = jax.jit(jax.vmap(jax.value_and_grad(objective.per_example_loss),
                                   in_axes=(None, 0, 0)))(params, batch, rngs)
  single = jax.jit(jax.value_and_grad(objective.per_example_loss))
  for i in range(6):
    example = jax.tree.map(lambda x: x[i], batch)
    loss, grad = single(params, example, rngs[i])
    np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6),
                 grads, grad)
  # One example's gradient depends on that example only.
  shifted = jax.tree.map(lambda x: x.at[1].set(x[2]), batch)
  grads_shifted = jax.jit(jax.vmap(jax.grad(objective.per_example_loss),
                                   in_axes=(None, 0, 0)))(params, shifted, rngs)
  others = np.array([0, 3, 4, 5])
  np.testing.assert_allclose(np.asarray(clipping.global_norms(grads_shifted))[others],
                             np.asarray(clipping.global_norms(grads))[others], rtol=1e-5)


def test_greedy_decode_shapes(small_objective):
  config, objective, params, _ = small_objective
  images = np.stack([sources.build_source(config.data)[i]["image"] for i in range(2)])
  captions = dpcap.caption_images(objective, params, images, config)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_paper_captioner_builds_at_full_size(tmp_path):
  config = dpcap_laion233m.get_config()
  vocab = tmp_path / "vocab.txt"  # a stand-in of the public BERT vocabulary's size
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                             [f"w{i}" for i in range(30_522 - 4)]) + "\n")
  config.tokenizer.vocab_file = str(vocab)
  objective = build_objective(config)
  shapes = jax.eval_shape(objective.init, jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  encoder = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["vit"]))
  assert 85e6 < encoder < 87e6  # ViT-B/16
  assert 150e6 < count < 200e6
  loss = jax.eval_shape(objective.per_example_loss, shapes,
                        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     objective.example_spec), jax.random.key(0))
  assert loss.shape == ()
