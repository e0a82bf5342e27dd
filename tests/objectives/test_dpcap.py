"""DP-Cap: the masked token loss, the captioner on real examples, per-example gradients,
greedy decoding, the paper's model, a frozen class token under the optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dpcap_laion233m
from dpvl import objectives
from dpvl.data import sources
from dpvl.data import tokenizers
from dpvl.objectives import build_objective
from dpvl.objectives import dpcap
from dpvl.privacy import clipping
from tests.helpers import raises_config_error


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
  # With eos_id, whatever follows the first EOS (2) is ignored, padding or not.
  np.testing.assert_allclose(
      dpcap.masked_token_loss(logits, jnp.array([3, 4, 2, 5, 6]), 0, eos_id=2), got, rtol=1e-6)
  # No target at all: 0, not nan.
  assert dpcap.masked_token_loss(logits, jnp.zeros(5, jnp.int32), 0, eos_id=2) == 0.0


@pytest.fixture(scope="module")
def small_objective(dpcap_config):
  config = dpcap_config()
  objective = build_objective(config)
  params = jax.jit(objective.init)(jax.random.key(0))
  source = sources.build_source(config.data)
  examples = [objective.prepare(source[i]) for i in range(6)]
  batch = {k: jnp.stack([e[k] for e in examples]) for k in examples[0]}
  return config, objective, params, batch


def test_captioner_uses_the_image(small_objective):
  _, objective, params, batch = small_objective
  tokens = jnp.broadcast_to(batch["tokens"][0, :-1], (2, batch["tokens"].shape[1] - 1))
  logits = jax.jit(objective.model.apply)({"params": params}, batch["image"][:2], tokens)
  assert logits.shape == (2, 47, 259) and logits.dtype == jnp.float32
  # Same tokens, different images: different logits at every position (cross-attention).
  assert np.all(np.abs(logits[0] - logits[1]).max(axis=-1) > 1e-5)


def test_dpcap_prepare_matches_the_spec(small_objective):
  _, objective, params, batch = small_objective
  for name, spec in objective.example_spec.items():
    assert batch[name].shape[1:] == spec.shape and batch[name].dtype == spec.dtype
  assert -1.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  with pytest.raises(ValueError):
    objective.prepare(dict(image=np.zeros((8, 8, 3), np.uint8), caption="a red ring"))


def test_dpcap_loss_ignores_what_follows_the_caption(small_objective):
  config, objective, params, batch = small_objective
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  example = jax.tree.map(lambda x: x[0], batch)
  tokens = np.asarray(example["tokens"])
  end = int(np.argmax(tokens == tokenizer.eos_id))
  assert 2 < end < len(tokens) - 3 and tokens[end + 1] == tokenizer.pad_id
  loss = jax.jit(objective.per_example_loss)
  rng = jax.random.key(0)
  base = loss(params, example, rng)
  garbage = tokens.copy()
  garbage[end + 1:] = np.random.default_rng(0).integers(3, tokenizer.vocab_size,
                                                        len(tokens) - end - 1)
  np.testing.assert_allclose(loss(params, dict(example, tokens=garbage), rng), base, rtol=1e-6)
  for length in (end + 1, end + 3):  # less padding (or none): the same loss
    np.testing.assert_allclose(loss(params, dict(example, tokens=tokens[:length]), rng), base,
                               rtol=1e-5)
  # The caption itself does count.
  edited = tokens.copy()
  edited[end - 1] = tokens[end - 1] + 1
  assert not np.isclose(loss(params, dict(example, tokens=edited), rng), base)


def test_dpcap_loss_is_finite_for_an_empty_caption(small_objective):
  config, objective, params, _ = small_objective
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  record = dict(image=np.zeros((16, 16, 3), np.uint8), caption="")
  example = objective.prepare(record)
  assert list(example["tokens"][:3]) == [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]
  loss, grads = jax.jit(jax.value_and_grad(objective.per_example_loss))(
      params, example, jax.random.key(0))
  assert np.isfinite(loss) and loss > 0
  assert np.isfinite(float(clipping.global_norms(jax.tree.map(lambda g: g[None], grads))[0]))


def test_dpcap_per_example_grads_match_a_loop(small_objective):
  _, objective, params, batch = small_objective
  rngs = jax.random.split(jax.random.key(0), 6)
  vmapped = jax.jit(jax.vmap(jax.value_and_grad(objective.per_example_loss),
                             in_axes=(None, 0, 0)))
  losses, grads = vmapped(params, batch, rngs)
  single = jax.jit(jax.value_and_grad(objective.per_example_loss))
  for i in range(6):
    example = jax.tree.map(lambda x, i=i: x[i], batch)
    loss, grad = single(params, example, rngs[i])
    np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
    jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6),
                 grads, grad)
  # One example's gradient depends on that example only.
  shifted = jax.tree.map(lambda x: x.at[1].set(x[2]), batch)
  _, grads_shifted = vmapped(params, shifted, rngs)
  others = np.array([0, 3, 4, 5])
  np.testing.assert_allclose(np.asarray(clipping.global_norms(grads_shifted))[others],
                             np.asarray(clipping.global_norms(grads))[others], rtol=1e-5)


def test_dpcap_bfloat16_activations_keep_a_float32_loss(dpcap_config):
  config = dpcap_config()
  config.model.dtype = "bfloat16"
  objective = build_objective(config)
  params = jax.jit(objective.init)(jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  source = sources.build_source(config.data)
  example = objective.prepare(source[0])
  loss, grads = jax.jit(jax.value_and_grad(objective.per_example_loss))(
      params, example, jax.random.key(0))
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Close to the float32 model's loss at the same parameters.
  f32 = jax.jit(build_objective(dpcap_config()).per_example_loss)(params, example, None)
  np.testing.assert_allclose(loss, f32, rtol=0.05)


def test_greedy_decode(small_objective):
  config, objective, params, _ = small_objective
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  images = np.stack([sources.build_source(config.data)[i]["image"] for i in range(2)])
  captions = dpcap.caption_images(objective, params, images, config)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  # A decoder forced to say EOS at once: BOS, EOS, then padding only.
  text = dict(params["text"])
  text["norm"] = dict(scale=jnp.zeros_like(text["norm"]["scale"]),
                      bias=jnp.zeros_like(text["norm"]["bias"]).at[0].set(1.0))
  head = jnp.zeros_like(text["head"]["kernel"]).at[0, tokenizer.eos_id].set(1.0)
  text["head"] = dict(kernel=head)
  forced = dict(params, text=text)
  x = jnp.zeros((2, 16, 16, 3))
  ids = jax.jit(dpcap.greedy_decode, static_argnums=(0, 3, 4, 5, 6))(
      objective.model, forced, x, 10, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
  assert ids.shape == (2, 10) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids[:, :2], [[tokenizer.bos_id, tokenizer.eos_id]] * 2)
  assert np.all(np.asarray(ids[:, 2:]) == tokenizer.pad_id)


def test_paper_captioner_builds_at_full_size(bert_sized_vocab):
  config = dpcap_laion233m.get_config()
  config.tokenizer.vocab_file = bert_sized_vocab
  objective = build_objective(config)
  shapes = jax.eval_shape(objective.init, jax.random.key(0))  # nothing is allocated
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  count, encoder, decoder = size(shapes), size(shapes["vit"]), size(shapes["text"])
  print(f"DP-Cap paper captioner: {count:,} parameters (ViT-B/16 {encoder:,}, "
        f"bridge {size(shapes['bridge']):,}, decoder {decoder:,}; trained {count - 768:,})")
  # DP-Cap's mae_vit_base_patch16_autoregressive_nobias: timm's ViT-B/16 without head, position
  # table (197 x 768, fixed) and qkv biases (12 x 3 x 768), its class token frozen.
  assert encoder == 86_567_656 - 769_000 - 197 * 768 - 12 * 3 * 768
  attention = shapes["vit"]["block0"]["attention"]
  assert "bias" not in attention["query"] and "bias" in attention["out"]  # qkv_bias=False
  assert shapes["vit"]["frozen_cls_token"].shape == (768,)
  assert shapes["bridge"]["bias"].shape == (768,) and size(shapes["bridge"]) == 768 * 769
  # The decoder: token embedding, 6 post-LN blocks (8 bias-free d x d maps, MLP, 3 norms), no
  # final norm, no position table (fixed sin-cos), a head of LayerNorm + linear with bias.
  d, vocab = 768, 30_522
  assert decoder == vocab * d + 6 * (8 * d * d + 2 * d * 3072 + 6 * d) + 2 * d + d * vocab + vocab
  assert {"norm", "pos_embedding"}.isdisjoint(shapes["text"])
  assert shapes["text"]["head"]["kernel"].shape == (768, 30_522)
  assert shapes["text"]["head"]["bias"].shape == (30_522,) and "head_norm" in shapes["text"]
  frozen = objectives.frozen_mask(objective, shapes)
  assert [jax.tree_util.keystr(p) for p, f in jax.tree_util.tree_leaves_with_path(frozen)
          if f] == ["['vit']['frozen_cls_token']"]
  example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), objective.example_spec)
  assert example["image"].shape == (224, 224, 3) and example["tokens"].shape == (40,)
  memory = jax.eval_shape(functools.partial(objective.model.apply,
                                            method=objective.model.encode_images),
                          {"params": shapes}, example["image"][None])
  assert memory.shape == (1, 1 + 196, 768)  # the class token, then the patches
  loss = jax.eval_shape(objective.per_example_loss, shapes, example, jax.random.key(0))
  assert loss.shape == () and loss.dtype == jnp.float32


def test_the_optimizer_keeps_a_frozen_class_token(dpcap_config):
  config = dpcap_config()
  config.model.encoder.cls_token = "frozen"
  objective = build_objective(config)
  assert objective.frozen(("vit", "frozen_cls_token"))
  assert not objective.frozen(("vit", "embedding", "kernel"))
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                        jax.eval_shape(objective.init, jax.random.key(0)))
  inner = optax.adamw(0.1, weight_decay=0.5)  # decay "all", as the papers
  optimizer = objectives.keep_frozen(inner, objective)
  state = optimizer.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(inner.init(params))  # same checkpoints
  noisy = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)  # e.g. DP noise on every leaf

  @jax.jit
  def step(params, state):
    updates, state = optimizer.update(noisy, state, params)
    return optax.apply_updates(params, updates), state

  new, state = step(*step(params, state))
  np.testing.assert_array_equal(new["vit"]["frozen_cls_token"], params["vit"]["frozen_cls_token"])
  moments = [x for p, x in jax.tree_util.tree_leaves_with_path(state)
             if "frozen_cls_token" in jax.tree_util.keystr(p)]
  assert moments and not any(np.any(np.asarray(m)) for m in moments)  # Adam never saw it
  assert np.all(np.asarray(new["vit"]["embedding"]["kernel"]) < 1)  # the rest does train


@pytest.mark.parametrize("field, value, match", [
    ("model.encoder.cls_token", "mean", r"encoder.cls_token='mean' is unknown"),
    ("model.encoder.dense_init", "he", r"encoder.dense_init='he' is unknown"),
    ("model.decoder.layout", "sandwich", r"decoder.layout='sandwich' is unknown"),
    ("model.decoder.posemb", "sincos2d", r"decoder.posemb='sincos2d' is unknown"),
    ("model.decoder.gelu", "relu", r"decoder.gelu='relu' is unknown"),
    ("model.memory_posemb", "learn", r"config.model.memory_posemb='learn' is unknown"),
    ("model.bridge_bias", "yes", r"config.model.bridge_bias must be True or False"),
])
def test_layout_options_are_checked_at_build(dpcap_config, field, value, match):
  config = dpcap_config()
  *parents, name = field.split(".")
  section = config
  for parent in parents:
    section = section[parent]
  with section.ignore_type():
    section[name] = value
  with raises_config_error(match):
    build_objective(config)
