"""Objectives: each defines a model, a per-example loss and the host-side example preparation.

An objective knows nothing about privacy: the engine in `dpvl.privacy` clips, sums and noises
whatever per-example loss the objective returns.
"""

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax

REGISTRY = {
    "dpcap": "dpvl.objectives.dpcap",
    "vip_mae": "dpvl.objectives.vip_mae",
    "dpclip": "dpvl.objectives.dpclip",
}


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the engine needs from an objective.

  Attributes:
    name: registry name.
    init: rng -> params (a pytree of arrays).
    per_example_loss: (params, example, rng) -> scalar loss of ONE example (no batch axis);
      None for a batch-coupled (contrastive) objective, which gives `dual_encoder` instead.
    prepare: host-side record (dict from a data source) -> example (dict of numpy arrays).
    example_spec: name -> jax.ShapeDtypeStruct of one prepared example.
    model: the Flax module, for evaluation hooks.
    encode: (params, images [B, H, W, 3] normalised) -> (tokens [B, T, D], list of every
      block's output): the image encoder's features, for evaluators (linear probe).
    image_size: side of the square images the encoder takes.
    dual_encoder: a contrastive objective's towers (`dpvl.privacy.contrastive.DualEncoder`),
      trained by the mechanisms of `privacy.contrastive` and read by zero-shot and retrieval.
    tokenize: text -> int32 token ids [max_len], for evaluators that embed text.
  """

  name: str
  init: Callable[[jax.Array], Any]
  per_example_loss: Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array] | None
  prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]]
  example_spec: Mapping[str, jax.ShapeDtypeStruct]
  model: Any = None
  encode: Callable[[Any, jax.Array], Any] | None = None
  image_size: int | None = None
  dual_encoder: Any = None
  tokenize: Callable[[str], Any] | None = None


def image_size(config) -> int:
  """`config.data.image_size`, checked to be a multiple of the encoder's patch size."""
  size, patch = config.data.image_size, config.model.encoder.patch_size
  if size % patch:
    raise ValueError(f"config.data.image_size={size} is not a multiple of "
                     f"config.model.encoder.patch_size={patch}.")
  return size


def build_objective(config) -> Objective:
  """Builds the objective named by `config.objective`."""
  name = config.objective
  if name not in REGISTRY:
    raise ValueError(
        f"config.objective={name!r} is unknown; choose one of {sorted(REGISTRY)}.")
  return importlib.import_module(REGISTRY[name]).build(config)
