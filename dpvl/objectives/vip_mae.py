"""ViP-MAE: masked-autoencoder pretraining as a private objective (Yu et al., 2023).

The privacy unit is one image. Its mask is drawn *inside* the per-example loss from that
example's own key, so the clipped gradient of one example depends on that example only; the
loss is the MSE on the masked patches only (optionally on per-patch normalised pixels).
`config.model.encoder.cls_token="learn"` is MAE's layout (`dpvl.models.mae`): the class token
is carried through the decoder, and neither predicted nor counted.
"""

import jax
import jax.numpy as jnp

from dpvl import config as config_lib
from dpvl import objectives
from dpvl.data import transforms
from dpvl.models.mae import DecoderSpec
from dpvl.models.mae import MaskedAutoencoder
from dpvl.models.vit import patchify
from dpvl.models.vit import vit_features


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Patches kept visible: round((1 - ratio) * T), at least 1."""
  return max(1, int(round(num_patches * (1.0 - mask_ratio))))


def random_keep(rng, num_patches: int, visible: int):
  """Indices of `visible` distinct patches chosen uniformly at random (sorted).

  Args:
    rng: the example's own key.
    num_patches: T, the patches of an image.
    visible: K <= T, the patches kept.

  Returns:
    int32 [K], ascending, in [0, T).
  """
  return jnp.sort(jax.random.permutation(rng, num_patches)[:visible])


def masked_patch_loss(pred, target, keep, norm_pix: bool = False):
  """Mean over masked patches of the per-patch MSE; pred, target [T, P], keep [K].

  Args:
    pred: [T, P] the decoder's pixels of every patch (P = patch_size**2 * 3).
    target: [T, P] the image's patches (`patchify`), float32.
    keep: int [K] indices of the visible patches; they do not count.
    norm_pix: normalise each target patch to zero mean, unit variance first (MAE).

  Returns:
    float32 scalar: the mean over the T - K masked patches of the mean squared error over P;
    0 when no patch is masked.
  """
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  masked = jnp.ones(target.shape[0], jnp.float32).at[keep].set(0.0)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * masked) / jnp.maximum(jnp.sum(masked), 1.0)


def check_model(config) -> None:
  """ConfigError naming the field for a `config.model` that the modules would reject at init."""
  objectives.check_encoder(config)
  # The decoder adds sin-cos position embeddings of its width (`MaskedAutoencoder`).
  objectives.check_transformer(config, "model.decoder", DecoderSpec, sincos=True)
  ratio = config_lib.get_field(config, "model.mask_ratio")
  config_lib.check(isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0,
                   f"config.model.mask_ratio must be in [0, 1), got {ratio}.")


def build(config) -> objectives.PerExampleObjective:
  """ViP-MAE: per-example MSE on the masked patches, the mask drawn from the example's key."""
  check_model(config)
  size, p = objectives.image_size(config), config.model.encoder.patch_size
  ratio = float(config.model.mask_ratio)
  model = MaskedAutoencoder(encoder=dict(config.model.encoder), decoder=dict(config.model.decoder),
                            dtype=objectives.model_dtype(config))
  num_patches = (size // p) ** 2
  visible = num_visible(num_patches, ratio)
  norm_pix = bool(config.model.get("norm_pix_loss", False))
  normalization = objectives.normalization(config)
  spec = dict(image=jax.ShapeDtypeStruct((size, size, 3), jnp.float32))

  def init(rng):
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return model.init(rng, images, jnp.zeros((1, visible), jnp.int32))["params"]

  def prepare(record):
    image = transforms.model_image(record["image"], size, normalization)
    return dict(image=image)

  def per_example_loss(params, example, rng):
    keep = random_keep(rng, num_patches, visible)
    pred = model.apply({"params": params}, example["image"][None], keep[None])[0]
    target = patchify(example["image"][None], p)[0]
    return masked_patch_loss(pred, target, keep, norm_pix)

  return objectives.PerExampleObjective(
      name="vip_mae", init=init, per_example_loss=per_example_loss, prepare=prepare,
      example_spec=spec, model=model, encode=vit_features(config.model.encoder, model.dtype),
      image_size=size, normalization=normalization)
