"""The published PyTorch models' state dicts -> dpvl parameter trees.

Two layouts, chosen by `config.objective`:
* "vip_mae": ViP's MAE (timm ViT encoder + MAE decoder): `patch_embed.proj`, `cls_token`,
  `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`,
  `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.N.*`, `decoder_norm`,
  `decoder_pred`.
* "dpcap": DP-Cap's captioner (`mae_vit_*_autoregressive_nobias`): the same encoder, the
  type embeddings `{encoder,decoder}_{image,text}_type_embedding`, `decoder_embed`,
  `decoder_pos_embed`, `text_embedding_layer_SimVLM`, `text_decoder_pos_embed`,
  `decoder.layers.N.{self_attn.c_attn,self_attn.c_proj,multihead_attn.q_proj,
  multihead_attn.kv_proj,multihead_attn.c_proj,linear1,linear2,norm1,norm2,norm3}`,
  `decoder_pred_text.{0,1}`.

Each dpvl parameter is computed by one `Rule` from named source tensors; every source key must
be read by a rule or listed as ignored, and every dpvl parameter filled, else `ImportError_`
names what is wrong. Exact rewrites (the same function as the PyTorch model):
* torch Linear weights [out, in] -> kernels [in, out]; fused qkv / kv projections split into
  dpvl's per-head query, key and value kernels [D, heads, D / heads];
* the patch embedding conv [D, C, p, p] -> a dense kernel over `patchify`'s (row, column,
  channel) order, with the file's input normalisation (ImageNet mean and std) folded in for
  dpvl's (`config.data.normalization`), and the MAE pixel head's output mapped back likewise;
* constants added to tokens (the class token's position row, DP-Cap's type embeddings) folded
  into the class token, the patch bias, the bridge bias or the token embedding table.
Fixed sin-cos tables are checked against dpvl's, not copied; a ViT position table that moved
in training (ViP trains all parameters) can be imported as `encoder.posemb="learn"`.
"""

import dataclasses
from typing import Callable

from flax import traverse_util
import numpy as np

from dpvl.importers import pth
from dpvl.models import vit as vit_lib

# torchvision's ImageNet statistics: the input normalisation of ViP's and DP-Cap's training.
FILE_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SINCOS_ATOL = 1e-4  # a table is dpvl's fixed sin-cos if no entry differs by more


class ImportError_(ValueError):  # noqa: N801  # not the builtin ImportError
  """The state dict does not fit the config's model; the message names keys and shapes."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """dpvl parameter `target` ("vit/block0/norm1/scale") = fn(*source tensors); a `target` of
  None is a check (fn raises ValueError if the sources are not what dpvl assumes)."""

  target: str | None
  sources: tuple[str, ...]
  fn: Callable[..., np.ndarray | None]


@dataclasses.dataclass(frozen=True)
class Options:
  """encoder_only: import the image encoder ("vit/...") only; the other parameters keep their
  fresh initialisation and the file's other keys are ignored. tolerate_posemb_drift: accept a
  decoder or memory position table that differs from dpvl's fixed sin-cos (recorded)."""

  encoder_only: bool = False
  tolerate_posemb_drift: bool = False


@dataclasses.dataclass
class Imported:
  """The filled parameters (nested) and what the import did besides exact copies."""

  params: dict
  initialised: list[str]  # dpvl parameters left at their fresh initialisation
  ignored: dict[str, str]  # file key -> why it is not read
  approximations: list[str]  # where dpvl's model differs from the file's


# --- small pure maps ----------------------------------------------------------------------


def linear_kernel(w):
  """torch Linear weight [out, in] -> Flax kernel [in, out]."""
  _check_ndim(w, 2)
  return w.T


def heads_kernel(w, heads: int, part: int = 0, parts: int = 1):
  """Part `part` of `parts` fused projections [parts * D, D] -> [D, heads, D / heads]."""
  _check_ndim(w, 2)
  d = w.shape[0] // parts
  if w.shape[0] != parts * d or d % heads:
    raise ValueError(f"cannot split into {parts} projections of {heads} heads")
  return w[part * d:(part + 1) * d].T.reshape(w.shape[1], heads, d // heads)


def heads_bias(b, heads: int, part: int = 0, parts: int = 1):
  """Part `part` of fused biases [parts * D] -> [heads, D / heads]."""
  _check_ndim(b, 1)
  d = b.shape[0] // parts
  if b.shape[0] != parts * d or d % heads:
    raise ValueError(f"cannot split into {parts} biases of {heads} heads")
  return b[part * d:(part + 1) * d].reshape(heads, d // heads)


def out_kernel(w, heads: int):
  """Attention output weight [D, D] (inputs head-major) -> [heads, D / heads, D]."""
  _check_ndim(w, 2)
  if w.shape[1] % heads:
    raise ValueError(f"{w.shape[1]} inputs do not split into {heads} heads")
  return w.T.reshape(heads, w.shape[1] // heads, w.shape[0])


def input_affine(dpvl_norm, file_norm=FILE_NORMALIZATION):
  """(a, b) per channel with file_input = a * dpvl_input + b (both `(pixel - mean) / std`)."""
  (md, sd), (mf, sf) = (tuple(np.asarray(v, np.float64) for v in n) for n in (dpvl_norm,
                                                                               file_norm))
  return sd / sf, (md - mf) / sf


def patch_kernel(w, a):
  """Conv weight [D, C, p, p] -> dense kernel [p * p * C, D] on `patchify`'s (row, column,
  channel) order, inputs scaled by `a` per channel."""
  _check_ndim(w, 4)
  if w.shape[2] != w.shape[3] or w.shape[1] != len(a):
    raise ValueError("expected a square patch conv over 3 channels")
  w = w.astype(np.float64) * np.asarray(a)[None, :, None, None]
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def patch_bias(w, bias, b, *extra):
  """The patch embedding's bias with the input shift `b` per channel folded in (sum over the
  conv's window of w * b), plus any constant token embeddings `extra` ([1, 1, D] each)."""
  _check_ndim(w, 4)
  out = bias.astype(np.float64) + np.einsum("ocij,c->o", w.astype(np.float64), np.asarray(b))
  return out + sum(_token(e) for e in extra)


def pixel_head(w, bias, dpvl_norm, channels: int = 3):
  """MAE pixel head [p*p*C, Dd] predicting file-normalised pixels -> (kernel, bias) predicting
  dpvl-normalised ones (outputs in (row, column, channel) order, as `patchify`)."""
  _check_ndim(w, 2)
  (md, sd), (mf, sf) = (tuple(np.asarray(v, np.float64) for v in n) for n in (dpvl_norm,
                                                                               FILE_NORMALIZATION))
  if w.shape[0] % channels:
    raise ValueError(f"{w.shape[0]} outputs are not whole pixels of {channels} channels")
  scale = np.tile(sf / sd, w.shape[0] // channels)
  shift = np.tile((mf - md) / sd, w.shape[0] // channels)
  return w.T.astype(np.float64) * scale[None], bias.astype(np.float64) * scale + shift


def _token(t):
  """[1, 1, D] or [D] -> [D]."""
  if t.ndim not in (1, 3) or t.size != t.shape[-1]:
    raise ValueError(f"expected a token [1, 1, D], got {list(t.shape)}")
  return t.reshape(-1).astype(np.float64)


def _check_ndim(x, ndim: int):
  if x.ndim != ndim:
    raise ValueError(f"expected {ndim} dimensions, got {list(x.shape)}")


def _check_table(what: str, expected: np.ndarray, hint: str):
  """A check rule's fn: the table [1, L, D] equals `expected` [L, D] within SINCOS_ATOL."""

  def check(table):
    if table.ndim != 3 or table.shape[1:] != expected.shape:
      raise ValueError(f"{what} has shape {list(table.shape)}, dpvl's model needs "
                       f"[1, {expected.shape[0]}, {expected.shape[1]}] ({hint})")
    diff = float(np.max(np.abs(table[0] - expected)))
    if diff > SINCOS_ATOL:
      raise _Drift(f"{what} differs from dpvl's fixed sin-cos table by up to {diff:.3g}", diff)

  return check


class _Drift(ValueError):
  def __init__(self, message: str, diff: float):
    super().__init__(message)
    self.diff = diff


# --- rules ---------------------------------------------------------------------------------


def _layer_norm(src: str, dst: str) -> list[Rule]:
  return [Rule(f"{dst}/scale", (f"{src}.weight",), _vector),
          Rule(f"{dst}/bias", (f"{src}.bias",), _vector)]


def _vector(x):
  _check_ndim(x, 1)
  return x


def _dense(src: str, dst: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{dst}/kernel", (f"{src}.weight",), linear_kernel)]
  return rules + ([Rule(f"{dst}/bias", (f"{src}.bias",), _vector)] if bias else [])


def timm_block(src: str, dst: str, heads: int, qkv_bias: bool) -> list[Rule]:
  """A timm ViT `Block` (pre-LN; fused qkv) -> dpvl's `EncoderBlock`."""
  rules = _layer_norm(f"{src}.norm1", f"{dst}/norm1") + _layer_norm(f"{src}.norm2",
                                                                       f"{dst}/norm2")
  for i, name in enumerate(("query", "key", "value")):
    rules.append(Rule(f"{dst}/attention/{name}/kernel", (f"{src}.attn.qkv.weight",),
                      lambda w, i=i: heads_kernel(w, heads, i, 3)))
    if qkv_bias:
      rules.append(Rule(f"{dst}/attention/{name}/bias", (f"{src}.attn.qkv.bias",),
                        lambda b, i=i: heads_bias(b, heads, i, 3)))
  rules.append(Rule(f"{dst}/attention/out/kernel", (f"{src}.attn.proj.weight",),
                    lambda w: out_kernel(w, heads)))
  rules.append(Rule(f"{dst}/attention/out/bias", (f"{src}.attn.proj.bias",), _vector))
  return rules + _dense(f"{src}.mlp.fc1", f"{dst}/mlp/fc1") + _dense(f"{src}.mlp.fc2",
                                                                      f"{dst}/mlp/fc2")


def vit_rules(enc: dict, grid: tuple[int, int], dpvl_norm, token_consts=()) -> list[Rule]:
  """The timm ViT encoder with a class token -> dpvl's "vit". `token_consts`: keys of
  [1, 1, D] embeddings the file adds to every encoder token (folded in)."""
  cls = enc.get("cls_token", "none")
  if cls == "none":
    raise ImportError_("the file's encoder has a class token (cls_token), dpvl's config has "
                       "none: set config.model.encoder.cls_token to 'learn' or 'frozen'.")
  width, heads = enc["width"], enc["num_heads"]
  a, b = input_affine(dpvl_norm)
  consts = tuple(token_consts)
  cls_name = "cls_token" if cls == "learn" else vit_lib.FROZEN_PREFIX + "cls_token"
  rules = [
      Rule("vit/embedding/kernel", ("patch_embed.proj.weight",), lambda w: patch_kernel(w, a)),
      Rule("vit/embedding/bias", ("patch_embed.proj.weight", "patch_embed.proj.bias", *consts),
           lambda w, bias, *c: patch_bias(w, bias, b, *c)),
      Rule(f"vit/{cls_name}", ("cls_token", "pos_embed", *consts),
           lambda t, pos, *c: _token(t) + pos[0, 0] + sum(_token(x) for x in c)),
  ]
  expected = vit_lib.sincos2d_prefixed(*grid, width, 1)
  hint = f"a {grid[0]}x{grid[1]} patch grid and a class token"
  if enc.get("posemb", "sincos2d") == "learn":
    rules.append(Rule("vit/pos_embedding", ("pos_embed",),
                      lambda t: _rows(t, expected.shape, hint)[1:]))
  else:
    rules.append(Rule(None, ("pos_embed",), _check_table("pos_embed", expected, hint)))
  for i in range(enc["depth"]):
    rules += timm_block(f"blocks.{i}", f"vit/block{i}", heads, enc.get("qkv_bias", True))
  return rules + _layer_norm("norm", "vit/norm")


def _rows(table, shape, hint: str):
  if table.ndim != 3 or table.shape[1:] != shape:
    raise ValueError(f"expected [1, {shape[0]}, {shape[1]}] ({hint})")
  return table[0]


def vip_mae_rules(model: dict, grid, dpvl_norm) -> tuple[list[Rule], dict[str, str]]:
  """ViP's (MAE's) model -> dpvl's `MaskedAutoencoder`: (rules, ignorable keys)."""
  enc, dec = model["encoder"], model["decoder"]
  rules = vit_rules(enc, grid, dpvl_norm)
  rules += _dense("decoder_embed", "bridge")
  rules.append(Rule("mask_token", ("mask_token",), _token))
  expected = vit_lib.sincos2d_prefixed(*grid, dec["width"], 1)
  rules.append(Rule(None, ("decoder_pos_embed",), _check_table(
      "decoder_pos_embed", expected, f"a {grid[0]}x{grid[1]} grid and a class token")))
  for i in range(dec["depth"]):
    rules += timm_block(f"decoder_blocks.{i}", f"decoder_block{i}", dec["num_heads"], True)
  rules += _layer_norm("decoder_norm", "decoder_norm")
  if model.get("norm_pix_loss", False):  # per-patch normalised targets: no channel map exists
    rules += _dense("decoder_pred", "pixels")
  else:
    rules += [Rule("pixels/kernel", ("decoder_pred.weight", "decoder_pred.bias"),
                   lambda w, bias: pixel_head(w, bias, dpvl_norm)[0]),
              Rule("pixels/bias", ("decoder_pred.weight", "decoder_pred.bias"),
                   lambda w, bias: pixel_head(w, bias, dpvl_norm)[1])]
  head = "a classifier of the file's own probe or fine-tuning; dpvl's evaluators fit their own"
  return rules, {"head.weight": head, "head.bias": head, "fc_norm.weight": head,
                 "fc_norm.bias": head}


def dpcap_rules(model: dict, grid, dpvl_norm, text_len: int) -> tuple[list[Rule], dict]:
  """DP-Cap's captioner -> dpvl's `Captioner`: (rules, ignorable keys). `text_len`: the
  file's text position table length (its `text_max_length`)."""
  enc, dec = model["encoder"], model["decoder"]
  if dec.get("layout", "pre_ln") != "post_ln":
    raise ImportError_("the file's text decoder is post-LN with a LayerNorm + linear head: set "
                       "config.model.decoder.layout='post_ln'.")
  if not model.get("bridge_bias", False):
    raise ImportError_("the file's bridge (decoder_embed) has a bias: set "
                       "config.model.bridge_bias=True.")
  if model.get("memory_posemb", "none") != "sincos2d":
    raise ImportError_("the file adds fixed 2-D sin-cos positions to the memory: set "
                       "config.model.memory_posemb='sincos2d'.")
  width, heads, bias = dec["width"], dec["num_heads"], dec.get("use_bias", False)
  rules = vit_rules(enc, grid, dpvl_norm, ("encoder_image_type_embedding",))
  rules += [Rule("bridge/kernel", ("decoder_embed.weight",), linear_kernel),
            Rule("bridge/bias", ("decoder_embed.bias", "decoder_image_type_embedding"),
                 lambda b, t: _vector(b) + _token(t))]
  rules.append(Rule(None, ("decoder_pos_embed",), _check_table(
      "decoder_pos_embed", vit_lib.sincos2d_prefixed(*grid, width, 1),
      f"a {grid[0]}x{grid[1]} grid and a class token")))
  rules.append(Rule("text/token_embedding/embedding",
                    ("text_embedding_layer_SimVLM.weight", "decoder_text_type_embedding"),
                    lambda e, t: _matrix(e) + _token(t)[None]))
  text_hint = "the file's text_max_length"
  if dec.get("posemb", "learn") == "sincos1d":
    rules.append(Rule(None, ("text_decoder_pos_embed",), _check_table(
        "text_decoder_pos_embed", vit_lib.sincos1d(text_len, width), text_hint)))
  else:
    rules.append(Rule("text/pos_embedding", ("text_decoder_pos_embed",),
                      lambda t: _text_rows(t, dec["max_len"])))
  for i in range(dec["depth"]):
    src, dst = f"decoder.layers.{i}", f"text/block{i}"
    fused = [("self_attn.c_attn", "self_attention", ("query", "key", "value")),
             ("multihead_attn.q_proj", "cross_attention", ("query",)),
             ("multihead_attn.kv_proj", "cross_attention", ("key", "value"))]
    for name, attn, parts in fused:
      n = len(parts)
      for j, part in enumerate(parts):
        rules.append(Rule(f"{dst}/{attn}/{part}/kernel", (f"{src}.{name}.weight",),
                          lambda w, j=j, n=n: heads_kernel(w, heads, j, n)))
        if bias:
          rules.append(Rule(f"{dst}/{attn}/{part}/bias", (f"{src}.{name}.bias",),
                            lambda b, j=j, n=n: heads_bias(b, heads, j, n)))
    for name, attn in (("self_attn.c_proj", "self_attention"),
                       ("multihead_attn.c_proj", "cross_attention")):
      rules.append(Rule(f"{dst}/{attn}/out/kernel", (f"{src}.{name}.weight",),
                        lambda w: out_kernel(w, heads)))
      if bias:
        rules.append(Rule(f"{dst}/{attn}/out/bias", (f"{src}.{name}.bias",), _vector))
    rules += _dense(f"{src}.linear1", f"{dst}/mlp/fc1", bias)
    rules += _dense(f"{src}.linear2", f"{dst}/mlp/fc2", bias)
    for k in (1, 2, 3):
      rules += _layer_norm(f"{src}.norm{k}", f"{dst}/norm{k}")
    rules.append(Rule(None, (f"{src}.self_attn.bias",), _causal_mask))
  rules += _layer_norm("decoder_pred_text.0", "text/head_norm")
  rules += _dense("decoder_pred_text.1", "text/head")
  unused = "not read by the captioner (DP-Cap's model keeps it from its masked variants)"
  return rules, {"text_pos_embed": unused, "encoder_text_type_embedding": unused,
                 "mask_token": unused, "mask_token_text": unused}


def _matrix(x):
  _check_ndim(x, 2)
  return x


def _text_rows(table, max_len: int):
  if table.ndim != 3 or table.shape[1] < max_len:
    raise ValueError(f"expected [1, >= {max_len}, D] (config.tokenizer.max_len)")
  return table[0, :max_len]


def _causal_mask(mask):
  """The causal self-attention's mask buffer: ones on and below the diagonal."""
  m = mask.reshape(mask.shape[-2:]) if mask.ndim == 4 else mask
  if m.ndim != 2 or not np.array_equal(m, np.tril(np.ones_like(m))):
    raise ValueError("expected a lower-triangular mask of ones (causal attention)")


# --- the import ----------------------------------------------------------------------------


def _shape(tensor) -> list[int]:
  return list(tensor.shape)


def apply_rules(state: dict, abstract: dict, rules: list[Rule], ignorable: dict[str, str],
                options: Options, fresh: Callable[[], dict] | None = None,
                notes: list[str] | None = None) -> Imported:
  """Fills `abstract`'s parameters (structure, shapes, dtypes) from `state` by `rules`.

  Args:
    state: file key -> `pth.PthTensor` (or numpy array).
    abstract: the dpvl model's parameters (shapes and dtypes), nested.
    rules: one per dpvl parameter, plus checks.
    ignorable: file keys that may be present and are not read, with why.
    options: see `Options`.
    fresh: () -> freshly initialised parameters (nested), for `options.encoder_only`.
    notes: approximations of the layout to record (extended by tolerated drifts).

  Returns:
    The `Imported` parameters (numpy, dpvl's dtypes) and the record of what was done.

  Raises:
    ImportError_: naming every missing or unknown file key, every shape that does not fit,
      and every dpvl parameter left unfilled.
  """
  targets = traverse_util.flatten_dict(abstract, sep="/")
  notes = list(notes or [])
  ignored = {k: why for k, why in ignorable.items() if k in state}
  if options.encoder_only:
    rules, skipped = _encoder_rules(rules)
    why = "--encoder_only: only the image encoder is imported"
    ignored.update({k: why for k in skipped if k in state and k not in ignored})
  problems, out, used, cache = [], {}, set(), {}

  def read(key):
    if key not in cache:
      value = state[key]
      cache[key] = value.numpy() if isinstance(value, pth.PthTensor) else np.asarray(value)
    return cache[key]

  for rule in rules:
    missing = [k for k in rule.sources if k not in state]
    if missing:
      problems.append(f"missing key {', '.join(missing)} (for "
                      f"{rule.target or 'a check'})")
      continue
    used.update(rule.sources)
    described = ", ".join(f"{k} {_shape(state[k])}" for k in rule.sources)
    try:
      value = rule.fn(*(read(k) for k in rule.sources))
    except _Drift as e:
      if options.tolerate_posemb_drift and rule.sources[0] != "pos_embed":
        notes.append(f"{e}; dpvl keeps its table (--tolerate_posemb_drift)")
      elif rule.sources[0] == "pos_embed":
        problems.append(f"{e}: it was trained; import it as a learnt table with "
                        "--config.model.encoder.posemb=learn (and evaluate with the same)")
      else:
        problems.append(f"{e}: dpvl's model holds this table fixed and has no learnt "
                        "equivalent; --tolerate_posemb_drift imports the rest and records it")
      continue
    except ValueError as e:
      problems.append(f"{rule.target or 'check'} from {described}: {e}")
      continue
    if rule.target is None:
      continue
    if rule.target not in targets:
      problems.append(f"{described} maps to {rule.target}, which dpvl's model does not have "
                      "(check config.model)")
    elif rule.target in out:
      raise AssertionError(f"two rules fill {rule.target}")
    elif tuple(np.shape(value)) != tuple(targets[rule.target].shape):
      problems.append(f"{rule.target}: dpvl's model needs {list(targets[rule.target].shape)}, "
                      f"{described} gives {list(np.shape(value))}")
    else:
      out[rule.target] = np.asarray(value).astype(targets[rule.target].dtype)
  unknown = sorted(set(state) - used - set(ignored))
  if unknown:
    problems.append(f"unknown key{'s' if len(unknown) > 1 else ''} "
                    + ", ".join(f"{k} {_shape(state[k])}" for k in unknown[:20])
                    + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
                    + _hint(unknown))
  initialised = sorted(t for t in targets if t not in out)
  if options.encoder_only and fresh is not None:
    flat_fresh = traverse_util.flatten_dict(fresh(), sep="/")
    for t in initialised:
      if not t.startswith("vit/"):
        out[t] = np.asarray(flat_fresh[t])
  unfilled = [t for t in initialised if t not in out]
  if unfilled and not problems:
    problems.append("dpvl parameters no key fills: " + ", ".join(unfilled))
  if problems:
    raise ImportError_("the checkpoint does not fit config.model:\n  " + "\n  ".join(problems))
  return Imported(traverse_util.unflatten_dict(out, sep="/"),
                  [t for t in initialised if not t.startswith("vit/")], ignored, notes)


def _encoder_rules(rules: list[Rule]) -> tuple[list[Rule], set[str]]:
  """(the rules of "vit/..." parameters and checks of encoder keys, the other rules' keys)."""
  keep, skipped = [], set()
  for rule in rules:
    encoder = (rule.target or "").startswith("vit/") or (
        rule.target is None and rule.sources == ("pos_embed",))
    (keep.append(rule) if encoder else skipped.update(rule.sources))
  kept = {k for r in keep for k in r.sources}
  return keep, skipped - kept


def _hint(unknown: list[str]) -> str:
  if any(k.endswith("attn.qkv.bias") and k[:-4] + "weight" not in unknown for k in unknown):
    return " (the file's attention has qkv biases: config.model.encoder.qkv_bias=True?)"
  if any(k.startswith(("blocks.", "decoder_blocks.", "decoder.layers.")) for k in unknown):
    return " (the file's model is deeper than config.model)"
  return ""


def text_length(state: dict) -> int:
  """The file's text position table length (DP-Cap's `text_max_length`), 0 if none."""
  table = state.get("text_decoder_pos_embed")
  return int(table.shape[1]) if table is not None and len(table.shape) == 3 else 0
