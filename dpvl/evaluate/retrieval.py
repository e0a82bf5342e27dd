"""Image-text retrieval: recall@k in both directions over a captioned public source.

For n image-caption pairs, image i's rank is the number of captions more similar to it than its
own caption (0 is a hit at k = 1), and likewise for caption i over the images; recall@k is the
fraction of ranks below k. A caption identical to an image's own scores the same as it and so
never pushes it down.

Config (`config.evals.<name>`, type "retrieval"): data (a source with `image` and `caption`),
size (pairs), ks (default [1, 5]).
"""

import numpy as np

from dpvl.config import ConfigError
from dpvl.config import get_field
from dpvl.data import sources
from dpvl.evaluate.linear_probe import load_images
from dpvl.evaluate.zero_shot import image_and_text_embedders


def recall_at_k(sims: np.ndarray, ks) -> dict[str, float]:
  """Recall@k of the diagonal of similarities [n images, n captions], both directions."""
  own = np.diagonal(sims)
  image_ranks = np.sum(sims > own[:, None], axis=1)
  text_ranks = np.sum(sims > own[None, :], axis=0)
  out = {}
  for k in ks:
    out[f"image_to_text_recall@{k}"] = float(np.mean(image_ranks < k))
    out[f"text_to_image_recall@{k}"] = float(np.mean(text_ranks < k))
  return out


def build(config, name: str, objective):
  """params -> recall@k metrics of `config.evals.<name>`.

  The pairs are loaded and tokenized here, once; each call embeds them.

  Args:
    config: the run's config (`evals.<name>`).
    name: the evaluator's key under `config.evals`.
    objective: the run's objective; contrastive (its towers, `image_size` and `tokenize`).

  Returns:
    params -> {image_to_text_recall@k, text_to_image_recall@k for each k in ks, skipped}.

  Raises:
    ConfigError: for a non-contrastive objective, a missing field or data that cannot be read.
  """
  field = lambda f, *d: get_field(config, f"evals.{name}.{f}", *d)
  embed_images, embed_texts = image_and_text_embedders(objective, name)
  ks = [int(k) for k in field("ks", (1, 5))]
  try:
    images, captions, skipped = load_images(sources.build_source(field("data")),
                                            int(field("size")), objective.image_size,
                                            lambda record: record["caption"], f"{name}: images")
  except ValueError as e:
    raise ConfigError(f"config.evals.{name}.data: {e}") from None
  tokens = np.stack([objective.tokenize(c) for c in captions])

  def evaluate(params):
    sims = embed_images(params, images) @ embed_texts(params, tokens).T
    return dict(recall_at_k(sims, ks), skipped=sum(skipped.values()))

  return evaluate
