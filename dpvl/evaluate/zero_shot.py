"""Zero-shot classification with a contrastive model's two towers (CLIP's prompt ensembles).

Each class is the mean text embedding of its prompts (`templates`, each with one `{}` for the
class name), re-normalised; an image is assigned the class whose embedding is most similar to
its image embedding. Top-1 accuracy on a labelled public source.

Config (`config.evals.<name>`, type "zero_shot"): data (a labelled source of the data layer),
label_key, class_names (index = label), templates, size (images scored).
"""

import jax
import jax.numpy as jnp
import numpy as np

from dpvl import objectives
from dpvl.config import ConfigError
from dpvl.config import get_field
from dpvl.data import sources
from dpvl.evaluate.linear_probe import chunked
from dpvl.evaluate.linear_probe import load_labelled
from dpvl.models.clip import l2_normalize


def image_and_text_embedders(objective, name: str):
  """(uint8 images [n, S, S, 3] -> [n, d], tokens [n, L] -> [n, d]) chunked embedders of a
  contrastive objective, each taking the full parameters."""
  if not isinstance(objective, objectives.ContrastiveObjective):
    raise ConfigError(f"config.evals.{name} needs a contrastive objective (dpclip), not "
                      f"{objective.name!r}.")
  dual = objective.dual_encoder
  embed = lambda fn, key, tower, prepare=None: chunked(lambda params, x: jax.vmap(
      lambda one: fn(params[tower], {key: one}))(x), desc=f"{name}: {tower} embeddings",
      prepare=prepare)
  return (embed(dual.embed_image, "image", "image", objective.normalize),
          embed(dual.embed_text, "tokens", "text"))


def class_embeddings(text_embeddings: np.ndarray, num_classes: int) -> jax.Array:
  """[num_classes * templates, d] prompt embeddings (class-major) -> [num_classes, d]."""
  per_class = text_embeddings.reshape(num_classes, -1, text_embeddings.shape[-1])
  return l2_normalize(jnp.mean(per_class, axis=1))


def load_classes(config, name: str, objective, num_classes: int):
  """(images, labels, skipped) of `config.evals.<name>.data` (`size` records, labels under
  `label_key`); ConfigError for data that cannot be read or labels outside the classes."""
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  try:
    images, labels, skipped = load_labelled(sources.build_source(field("data")),
                                            int(field("size")), objective.image_size,
                                            field("label_key", "label"), f"{name}: images")
  except ValueError as e:
    raise ConfigError(f"config.evals.{name}.data: {e}") from None
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ConfigError(f"config.evals.{name}: labels must index class_names.")
  return images, labels, skipped


def build(config, name: str, objective):
  """params -> {top1, chance, skipped}: zero-shot accuracy of `config.evals.<name>`.

  The images and prompts are loaded and tokenized here, once; each call embeds them.

  Args:
    config: the run's config (`evals.<name>`).
    name: the evaluator's key under `config.evals`.
    objective: the run's objective; contrastive (its towers, `image_size` and `tokenize`).

  Returns:
    params -> {top1: accuracy, chance: 1 / number of classes, skipped: records skipped}.

  Raises:
    ConfigError: for a non-contrastive objective, missing class names or templates, a template
      without '{}', data that cannot be read, or labels that do not index `class_names`.
  """
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  class_names, templates = list(field("class_names")), list(field("templates"))
  if not class_names or not templates or any("{}" not in t for t in templates):
    raise ConfigError(f"config.evals.{name} needs class_names and templates with '{{}}'.")
  embed_images, embed_texts = image_and_text_embedders(objective, name)
  images, labels, skipped = load_classes(config, name, objective, len(class_names))
  prompts = np.stack([objective.tokenize(t.format(c)) for c in class_names for t in templates])

  def evaluate(params):
    classes = class_embeddings(embed_texts(params, prompts), len(class_names))
    predictions = np.argmax(embed_images(params, images) @ np.asarray(classes).T, axis=1)
    return dict(top1=float(np.mean(predictions == labels)), chance=1.0 / len(class_names),
                skipped=sum(skipped.values()))

  return evaluate
