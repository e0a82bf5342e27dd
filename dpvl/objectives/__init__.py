"""Objectives: each defines a model, how it learns, and the host-side example preparation.

Two kinds, by what the privacy engine gets from them:
* `PerExampleObjective` gives only a loss of one example; DP-SGD (`dpvl.privacy.dpsgd`) clips,
  sums and noises its per-example gradients, whatever the loss.
* `ContrastiveObjective` has a loss that couples every pair of a batch, so it gives its two
  towers (`dual_encoder`) instead, and the mechanisms of `dpvl.privacy.contrastive`, which
  declare and test their sensitivity, make the batch gradient private.
"""

import dataclasses
import difflib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from dpvl import config as config_lib
from dpvl import registry
from dpvl.data import transforms
from dpvl.models import vit
from dpvl.privacy import contrastive

REGISTRY = registry.Registry("config.objective", {
    "dpcap": "dpvl.objectives.dpcap:build",
    "vip_mae": "dpvl.objectives.vip_mae:build",
    "dpclip": "dpvl.objectives.dpclip:build",
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
  """What the engine and the evaluators need from every objective.

  Attributes:
    name: registry name.
    init: rng -> params (a pytree of arrays).
    prepare: host-side record (dict from a data source) -> example (dict of numpy arrays).
    example_spec: name -> jax.ShapeDtypeStruct of one prepared example.
    model: the Flax module, for evaluation hooks.
    encode: (params, images [B, H, W, 3] normalised) -> (tokens [B, T, D], list of every
      block's output): the image encoder's features, for evaluators (linear probe).
    image_size: side of the square images the encoder takes.
    normalization: how `prepare` normalises images (`config.data.normalization`, a key of
      `transforms.NORMALIZATIONS`); evaluators feed the encoder through `normalize`.
    tokenize: text -> int32 token ids [max_len], for evaluators that embed text.
    frozen: parameter path (its keys, e.g. ("vit", "frozen_cls_token")) -> whether the
      parameter keeps its initial value: the model reads it through `stop_gradient`, and the
      optimizer must not move it either (`keep_frozen`). By default the parameters named
      `frozen_*` (`dpvl.models.vit.is_frozen`).
  """

  name: str
  init: Callable[[jax.Array], Any]
  prepare: Callable[[Mapping[str, Any]], Mapping[str, Any]]
  example_spec: Mapping[str, jax.ShapeDtypeStruct]
  model: Any = None
  encode: Callable[[Any, jax.Array], Any] | None = None
  image_size: int | None = None
  normalization: str = "half"
  tokenize: Callable[[str], Any] | None = None
  frozen: Callable[[tuple[str, ...]], bool] = vit.is_frozen

  def normalize(self, images):
    """uint8 images [..., H, W, 3] -> float32 model inputs, normalised as `prepare` does."""
    return transforms.normalize_image(images, self.normalization)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerExampleObjective(Objective):
  """An objective whose loss is a sum over examples, trained with per-example clipping.

  Attributes:
    per_example_loss: (params, example, rng) -> scalar loss of ONE example (no batch axis).
  """

  per_example_loss: Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContrastiveObjective(Objective):
  """A batch-coupled (contrastive) objective: no per-example loss, two towers instead.

  Attributes:
    dual_encoder: the towers, trained by the mechanisms of `dpvl.privacy.contrastive` and read
      by the zero-shot and retrieval evaluators.
  """

  dual_encoder: contrastive.DualEncoder


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def frozen_mask(objective: Objective, params) -> Any:
  """A pytree of bools like `params` (or gradients, updates): True on the frozen parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(objective.frozen(_path_keys(path))), params)


def keep_frozen(optimizer: optax.GradientTransformation,
                objective: Objective) -> optax.GradientTransformationExtraArgs:
  """`optimizer`, but the frozen parameters' gradients and updates are zero, so no step (noise,
  weight decay, momentum) moves them. Its state is `optimizer`'s own: checkpoints of either
  load in the other."""

  def zero_frozen(tree):
    return jax.tree.map(lambda x, frozen: jnp.zeros_like(x) if frozen else x, tree,
                        frozen_mask(objective, tree))

  def update(updates, state, params=None, **extra_args):
    updates, state = optax.with_extra_args_support(optimizer).update(
        zero_frozen(updates), state, params, **extra_args)
    return zero_frozen(updates), state

  return optax.GradientTransformationExtraArgs(optimizer.init, update)


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def normalization(config) -> str:
  """`config.data.normalization`: "half" (the default) or "imagenet"
  (`transforms.NORMALIZATIONS`); ConfigError for another name."""
  name = config_lib.get_field(config, "data.normalization", "half")
  try:
    return transforms.check_normalization(name)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.{e}") from None


def image_size(config) -> int:
  """`config.data.image_size`, checked to be a multiple of the encoder's patch size."""
  size = config_lib.get_field(config, "data.image_size")
  patch = config_lib.get_field(config, "model.encoder.patch_size")
  config_lib.check(_positive_int(size),
                   f"config.data.image_size must be a positive integer, got {size!r}.")
  config_lib.check(_positive_int(patch),
                   f"config.model.encoder.patch_size must be a positive integer, got {patch!r}.")
  config_lib.check(size % patch == 0, f"config.data.image_size={size} is not a multiple of "
                   f"config.model.encoder.patch_size={patch}.")
  return size


def model_dtype(config) -> jnp.dtype:
  """`config.model.dtype` (the activation dtype), or a ConfigError naming it."""
  name = config_lib.get_field(config, "model.dtype")
  try:
    return jnp.dtype(name)
  except TypeError:
    raise config_lib.ConfigError(f"config.model.dtype={name!r} is not a dtype; use e.g. "
                                 "'float32' or 'bfloat16'.") from None


def module_fields(module: type, given=()) -> tuple[set[str], set[str]]:
  """(all, required) keyword fields of a Flax module class (or dataclass), less `given` and
  dtype (set by the builder)."""
  fields = [f for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name", "dtype", *given)]
  required = {f.name for f in fields
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
  return {f.name for f in fields}, required


def _defaults(module: type) -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(module)
          if f.default is not dataclasses.MISSING}


_TRANSFORMER = ("width", "depth", "num_heads", "mlp_dim")


def check_transformer(config, field: str, module: type | None = None, given=(),
                      sincos: bool = False) -> None:
  """Checks `config.<field>`, the keyword arguments of a transformer, before any model is built.

  The modules check the same at `init` only (inside jit), so a typo would fail there, in a
  traceback; this fails at once with a ConfigError naming the field.

  Args:
    config: the run's config.
    field: dotted path of the section, e.g. "model.encoder".
    module: the Flax module class (or dataclass) it is passed to: it names the allowed and
      required fields, and its `CHOICES` the values of its string options (None: exactly
      width, depth, num_heads and mlp_dim).
    given: fields of `module` the builder sets itself (not allowed in the section).
    sincos: the module adds sin-cos position embeddings of this width whatever `posemb` says.
  """
  section = config_lib.get_field(config, field)
  config_lib.check(hasattr(section, "keys"), f"config.{field} must be a dict of fields, got "
                   f"{section!r}.")
  section = dict(section)
  names, required = (module_fields(module, given) if module is not None else
                     (set(_TRANSFORMER), set(_TRANSFORMER)))
  unknown = sorted(set(section) - names)
  if unknown and unknown[0] in given:
    raise config_lib.ConfigError(f"config.{field}.{unknown[0]} cannot be set: the objective "
                                 "derives it from the rest of the config.")
  if unknown:
    close = difflib.get_close_matches(unknown[0], names, n=1)
    raise config_lib.ConfigError(f"config.{field} has no field {unknown[0]!r}; " + (
        f"did you mean {close[0]!r}?" if close else f"its fields are {sorted(names)}."))
  missing = sorted(required - set(section))
  if missing:
    raise config_lib.ConfigError(f"config.{field}.{missing[0]} is missing.")
  for name in ("patch_size", *_TRANSFORMER):
    if name in section:
      config_lib.check(_positive_int(section[name]), f"config.{field}.{name} must be a "
                       f"positive integer, got {section[name]!r}.")
  width, heads = section["width"], section["num_heads"]
  config_lib.check(width % heads == 0, f"config.{field}.width={width} is not divisible by "
                   f"config.{field}.num_heads={heads}.")
  values = {**(_defaults(module) if module is not None else {}), **section}
  for name, allowed in (getattr(module, "CHOICES", None) or {}).items():
    config_lib.check(values.get(name) in allowed, f"config.{field}.{name}={values.get(name)!r} "
                     "is unknown; use " + " or ".join(map(repr, allowed)) + ".")
  posemb = values.get("posemb")
  if sincos or posemb == "sincos2d":
    config_lib.check(width % 4 == 0, f"config.{field}.width={width} must be divisible by 4 "
                     "for sin-cos position embeddings.")
  if posemb == "sincos1d":
    config_lib.check(width % 2 == 0, f"config.{field}.width={width} must be even for sin-cos "
                     "position embeddings.")


def check_encoder(config) -> None:
  """Checks `config.model.encoder` (the ViT every objective shares) and the image size."""
  check_transformer(config, "model.encoder", vit.ViT)
  image_size(config)


def build_objective(config) -> Objective:
  """Builds the objective named by `config.objective`.

  Args:
    config: the run's config.

  Returns:
    The objective; ConfigError naming the field for an unknown name or a bad model, tokenizer
    or data field, before any model is initialised.
  """
  return REGISTRY[config.objective](config)
