"""The masked autoencoder with MAE's class token: carried through the decoder, never predicted."""

import jax
import jax.numpy as jnp
import numpy as np

from dpvl.models import vit as vit_lib
from dpvl.models.mae import MaskedAutoencoder
from dpvl.objectives import vip_mae

ENCODER = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)
DECODER = dict(width=8, depth=1, num_heads=2, mlp_dim=16)


def _shapes(model, images, keep):
  tree = jax.eval_shape(model.init, jax.random.key(0), images, keep)["params"]
  return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_the_class_token_is_carried_through_the_decoder_and_never_predicted():
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  other = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  keep = jnp.array([[0, 5, 6, 15], [1, 2, 3, 9]])
  masked = np.ones((2, 16), bool)
  masked[np.arange(2)[:, None], np.asarray(keep)] = False
  mae = lambda depth, cls="learn": MaskedAutoencoder(
      encoder=dict(ENCODER, cls_token=cls), decoder=dict(DECODER, depth=depth))
  added = set(_shapes(mae(1), images, keep).items()) - set(
      _shapes(mae(1, "none"), images, keep).items())
  assert added == {("['vit']['cls_token']", (16,))}  # nothing else changes
  shallow, deep = mae(0), mae(1)  # a decoder of no block: each token is predicted alone
  target = vit_lib.patchify(images, 4)
  loss = jax.vmap(vip_mae.masked_patch_loss)

  @jax.jit
  def run(key):
    out = {}
    for name, model in (("shallow", shallow), ("deep", deep)):
      params = model.init(key, images, keep)["params"]
      moved = jax.tree.map(lambda x: x, params)
      moved["vit"]["cls_token"] = jax.random.normal(key, (16,))  # (LN ignores a shift)
      preds = jax.vmap(lambda p, x, model=model: model.apply({"params": p}, x, keep))(
          jax.tree.map(lambda *a: jnp.stack(a), params, moved, params),
          jnp.stack([images, images, other]))
      out[name] = (params, preds, [loss(pred, target, keep) for pred in preds[:2]])
    return out

  out = run(jax.random.key(0))
  params, (pred, moved_cls, other_images), losses = out["shallow"]
  assert pred.shape == (2, 16, 4 * 4 * 3)  # T patches: the class token's row is dropped
  # Without decoder blocks, a masked patch's prediction is pixels(LN(mask token + its position)):
  # aligned with its patch (no shift by the class token), blind to the image and the cls.
  x = params["mask_token"] + vit_lib.sincos2d(4, 4, 8)
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  x = x * params["decoder_norm"]["scale"] + params["decoder_norm"]["bias"]
  want = x @ params["pixels"]["kernel"] + params["pixels"]["bias"]
  np.testing.assert_allclose(pred[masked], np.broadcast_to(want, (2, 16, 48))[masked], atol=1e-5)
  np.testing.assert_allclose(other_images[masked], pred[masked], atol=1e-6)
  np.testing.assert_allclose(moved_cls[masked], pred[masked], atol=1e-6)
  assert not np.allclose(moved_cls[~masked], pred[~masked])  # the visible patches saw the cls
  # So the loss, which counts the masked patches only, ignores the cls token here ...
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
  # ... and a decoder block makes every masked prediction read it.
  _, (pred, moved_cls, _), losses = out["deep"]
  assert np.all(np.asarray(losses[1]) != np.asarray(losses[0]))
  assert np.all(np.abs(moved_cls - pred)[masked].max(-1) > 0)
