"""DP-CLIP: contrastive image-text pretraining of a dual encoder under DP.

The symmetric InfoNCE loss couples every pair of a batch, so this objective defines no
per-example loss: it gives the engine its two towers (`DualEncoder`) and the privacy mechanism
(`config.privacy.mechanism`: "per_batch" or "logit_dp", see `dpvl.privacy.contrastive`) turns
them into a private gradient with a declared sensitivity. The temperature is fixed
(`config.model.temperature`), because Logit-DP's sensitivity depends on it.
"""

import jax
import jax.numpy as jnp

from dpvl import config as config_lib
from dpvl import objectives
from dpvl.data import tokenizers
from dpvl.data import transforms
from dpvl.models.clip import ImageTower
from dpvl.models.clip import TextTower
from dpvl.models.vit import vit_features
from dpvl.privacy import contrastive


def towers(config, tokenizer) -> tuple[ImageTower, TextTower]:
  """The image and text towers of `config.model`."""
  dtype = objectives.model_dtype(config)
  dim = config.model.embed_dim
  image = ImageTower(encoder=dict(config.model.encoder), embed_dim=dim, dtype=dtype)
  text = TextTower(vocab_size=tokenizer.vocab_size, max_len=config.tokenizer.max_len,
                   embed_dim=dim, eos_id=tokenizer.eos_id, dtype=dtype,
                   **dict(config.model.text))
  return image, text


def check_model(config) -> None:
  """ConfigError naming the field for a `config.model` that the modules would reject at init."""
  objectives.check_encoder(config)
  objectives.check_transformer(config, "model.text", TextTower,
                               given=("vocab_size", "max_len", "embed_dim", "eos_id"))
  dim = config_lib.get_field(config, "model.embed_dim")
  config_lib.check(isinstance(dim, int) and not isinstance(dim, bool) and dim > 0,
                   f"config.model.embed_dim must be a positive integer, got {dim!r}.")
  temperature = config_lib.get_field(config, "model.temperature")
  config_lib.check(isinstance(temperature, (int, float)) and temperature > 0,
                   f"config.model.temperature must be positive, got {temperature}.")


def build(config) -> objectives.ContrastiveObjective:
  """DP-CLIP's dual encoder, example preparation and features for the evaluators."""
  check_model(config)
  tokenizer = tokenizers.build_tokenizer(config_lib.get_field(config, "tokenizer"))
  image_tower, text_tower = towers(config, tokenizer)
  temperature = float(config.model.temperature)
  size, length = objectives.image_size(config), config.tokenizer.max_len
  normalization = objectives.normalization(config)
  spec = dict(image=jax.ShapeDtypeStruct((size, size, 3), jnp.float32),
              tokens=jax.ShapeDtypeStruct((length,), jnp.int32))

  def init(rng):
    ki, kt = jax.random.split(rng)
    return dict(
        image=image_tower.init(ki, jnp.zeros((1, size, size, 3), jnp.float32))["params"],
        text=text_tower.init(kt, jnp.zeros((1, length), jnp.int32))["params"])

  def prepare(record):
    caption = record["caption"]
    if not isinstance(caption, (str, bytes)):
      raise ValueError(f"caption must be text, got {type(caption).__name__}.")
    return dict(image=transforms.model_image(record["image"], size, normalization),
                tokens=tokenizer.encode(caption))

  dual = contrastive.DualEncoder(
      embed_image=lambda p, ex: image_tower.apply({"params": p}, ex["image"][None])[0],
      embed_text=lambda p, ex: text_tower.apply({"params": p}, ex["tokens"][None])[0],
      temperature=temperature)
  vit_encode = vit_features(config.model.encoder, image_tower.dtype)
  return objectives.ContrastiveObjective(
      name="dpclip", init=init, dual_encoder=dual, prepare=prepare, example_spec=spec,
      model=(image_tower, text_tower),
      encode=lambda params, images: vit_encode(params["image"], images), image_size=size,
      normalization=normalization, tokenize=tokenizer.encode)
