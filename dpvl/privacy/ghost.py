"""Book-keeping ghost clipping: per-example clipped gradient sums from ONE backward pass.

For a dense layer y = a W + b applied to the T tokens of one example (input a [T, d], output
gradient g [T, p]), the example's weight gradient is a^T g and its bias gradient sum_t g_t.
Book-keeping (Bu et al., "Differentially private optimization on large model at small cost",
ICML 2023) reads every layer's per-example norm and clipped sum from one backward pass:

  1. forward once, keeping each covered layer's input a (the tape);
  2. backward once, for the gradients of zero perturbations added to the covered layers'
     outputs: these are the per-example output gradients g;
  3. squared norms, layer by layer: ||a^T g||^2 directly (O(T d p)) or <a a^T, g g^T> (Gram
     form, O(T^2 (d + p))), whichever is cheaper: Gram when 2 T^2 < d p;
  4. the clipped sum from the same a and g and each example's clip factor c:
     einsum('btd,btp,b->dp', a, g, c). No second backward pass.

Layer rules: `nn.Dense` and `nn.DenseGeneral` with the standard dot product (kernel and bias:
patch embeddings, attention projections, MLPs, heads) and `nn.Embed` (token embeddings: the Gram
form compares token ids). Every other parameter (LayerNorm scales and biases, learnt position
embeddings, MAE's mask token, a layer without a rule) enters the vmapped loss with a batch axis,
so the same backward pass returns its per-example gradient exactly as `jax.vmap(jax.grad)`
would: the exact fallback, cheap for these vectors. A covered layer whose weights are also read
outside the layer, or that runs twice for one example, falls back too: `discover` reads both
off the traced loss.

The "example" is whatever unit the mechanism clips: one example for DP-SGD, a hash group for
per-batch clipping; a unit that embeds its examples one by one does so with `vmap` below, which
carries the tape through. Norms, clip factors and sums are float32 whatever the activations' dtype,
with the matmuls at full float32 precision.
"""

import dataclasses
import math
from typing import Any, Callable

from flax import linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

from dpvl.parallel import mesh as mesh_lib

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Layer:
  """One covered layer call of a unit's loss.

  Attributes:
    kind: "dense" (`nn.Dense`, `nn.DenseGeneral`) or "embed" (`nn.Embed`).
    kernel: the index of its kernel (embedding table) among the parameters' leaves.
    bias: the index of its bias, or None.
    axis: dense: the contracted axes of one unit's input, in the kernel's order.
    output: one unit's output of the layer: the perturbation's shape and dtype.
    tokens: T, the rows of the unit's input once flattened to [T, fan_in].
    fan_in: d (embed: the vocabulary size).
    fan_out: p (embed: the embedding width).
    scope: the `vmap` calls of the unit the layer runs under, by their order (() for none).
  """

  kind: str
  kernel: int
  bias: int | None
  axis: tuple[int, ...]
  output: jax.ShapeDtypeStruct
  tokens: int
  fan_in: int
  fan_out: int
  scope: tuple[int, ...] = ()

  @property
  def gram(self) -> bool:
    """Whether the norm takes the Gram form (cheaper here than the direct one)."""
    if self.kind == "embed":  # direct: a [vocab, width] scatter per unit
      return self.tokens ** 2 < self.fan_in
    return 2 * self.tokens ** 2 < self.fan_in * self.fan_out

  def under(self, size: int, child: int) -> "Layer":
    """This layer (found inside `vmap` call `child` of `size` rows) seen from outside it."""
    return dataclasses.replace(
        self, axis=tuple(a + 1 for a in self.axis), tokens=self.tokens * size,
        output=jax.ShapeDtypeStruct((size, *self.output.shape), self.output.dtype),
        scope=(child, *self.scope))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which parameters take which rule, for one loss and parameter structure.

  Attributes:
    layers: the covered layer calls.
    direct: indices of the leaves whose per-example gradients are computed directly (the
      fallback), in order.
    names: every leaf's path, for reports.
    reasons: leaf index -> why a leaf that is not a LayerNorm's takes the fallback.
  """

  layers: tuple[Layer, ...]
  direct: tuple[int, ...]
  names: tuple[str, ...]
  reasons: dict

  def describe(self, params) -> str:
    """One paragraph: parameters covered by each rule, and every fallback leaf with its reason."""
    sizes = [x.size for x in jax.tree.leaves(params)]
    total = sum(sizes)
    dense = [l for l in self.layers if l.kind == "dense"]
    embed = [l for l in self.layers if l.kind == "embed"]
    covered = sum(sizes[i] for l in self.layers for i in (l.kernel, l.bias) if i is not None)
    norms = [i for i in self.direct if i not in self.reasons]
    text = (f"ghost clipping: {covered:,} of {total:,} parameters by layer rules "
            f"({len(dense)} dense, {sum(l.gram for l in dense)} of them in Gram form; "
            f"{len(embed)} embeddings); {len(norms)} LayerNorm leaves "
            f"({sum(sizes[i] for i in norms):,}) with per-example gradients")
    if self.reasons:
      text += "; exact per-example fallback for " + ", ".join(
          f"{self.names[i]} ({sizes[i]:,}: {why})" for i, why in sorted(self.reasons.items()))
    return text + "."


_TAPES: list["_Tape"] = []


class _Tape:
  """The state of one unit's traced loss: perturbations in, layer inputs out.

  While discovering, `perturbations` is None and the layer calls are recorded in `found`.
  """

  def __init__(self, leaves, weights, perturbations=None, scopes=None, index=None):
    self.index = index if index is not None else {id(x): i for i, x in enumerate(leaves)}
    self.weights = weights
    self.perturbations = perturbations  # kernel index -> [*output]
    self.scopes = scopes or {}          # kernel index -> Layer.scope
    self.inputs = {}                    # kernel index -> the layer's input
    self.found = {}                     # kernel index -> Layer
    self.twice = set()                  # kernel indices of layers that ran more than once
    self.layer_norms = set()
    self.children = 0
    self.busy = False

  def __enter__(self):
    _TAPES.append(self)
    return self

  def __exit__(self, *_):
    _TAPES.pop()


def _leaf(tape: _Tape, module: nn.Module, name: str) -> int | None:
  if not module.has_variable("params", name):
    return None
  return tape.index.get(id(module.get_variable("params", name)))


def _normalised(axis, ndim: int) -> tuple[int, ...]:
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axis)


def _intercept(next_fun, args, kwargs, context):
  """Runs a covered layer on the tape's weights, perturbs its output and records its input."""
  tape = _TAPES[-1] if _TAPES else None
  module = context.module
  if tape is None or tape.busy or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if isinstance(module, nn.LayerNorm):
    tape.layer_norms.update(i for i in (_leaf(tape, module, "scale"), _leaf(tape, module, "bias"))
                            if i is not None)
    return next_fun(*args, **kwargs)
  # Exactly these classes: a subclass may compute anything from the same weights.
  if type(module) is nn.Embed:
    kind, name = "embed", "embedding"
  elif (type(module) is nn.Dense or (type(module) is nn.DenseGeneral
                                      and not module.batch_dims)) and (
      module.dot_general is None and module.dot_general_cls is None):  # a^T g holds
    kind, name = "dense", "kernel"
  else:
    return next_fun(*args, **kwargs)
  kernel, bias = _leaf(tape, module, name), _leaf(tape, module, "bias")
  if kernel is None or len(args) != 1 or kwargs or (
      tape.perturbations is not None and kernel not in tape.perturbations):
    return next_fun(*args, **kwargs)
  weights = {name: tape.weights[kernel]}
  if bias is not None:
    weights["bias"] = tape.weights[bias]
  tape.busy = True
  try:  # an unbound copy of the layer on the tape's weights, never the model's own copy
    out = module.clone(parent=None).apply({"params": weights}, *args)
  finally:
    tape.busy = False
  x = args[0]
  if kind == "dense":
    dtype = module.dtype or jnp.result_type(x, tape.weights[kernel])
    x = x.astype(dtype)  # what the layer multiplies
  if tape.perturbations is None:
    if kernel in tape.found:
      tape.twice.add(kernel)
    tape.found[kernel] = _layer(kind, kernel, bias, x, out, module)
    return out
  tape.inputs[kernel] = x
  return out + tape.perturbations[kernel]


def _layer(kind, kernel, bias, x, out, module) -> Layer:
  if kind == "embed":
    axis, fan_in, fan_out = (), module.num_embeddings, out.shape[-1]
  else:
    axis = _normalised(getattr(module, "axis", -1), x.ndim)
    fan_in = math.prod(x.shape[a] for a in axis)
    features = module.features
    features = 1 if isinstance(features, int) else len(features)
    fan_out = math.prod(out.shape[out.ndim - features:])
  return Layer(kind=kind, kernel=kernel, bias=bias, axis=axis,
               output=jax.ShapeDtypeStruct(out.shape, out.dtype),
               tokens=math.prod(x.shape) // (1 if kind == "embed" else fan_in),
               fan_in=fan_in, fan_out=fan_out)


def vmap(fn: Callable, in_axes=0) -> Callable:
  """`jax.vmap(fn, in_axes)` (out_axes 0) that carries an active tape through.

  Code run under ghost clipping that maps a per-example function over the examples of a unit
  (per-batch clipping's group) uses this instead of `jax.vmap`; without a tape it is
  `jax.vmap`.
  """

  def mapped(*args):
    tape = _TAPES[-1] if _TAPES else None
    if tape is None or tape.busy:
      return jax.vmap(fn, in_axes)(*args)
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    size = next(jax.tree.leaves(x)[0].shape[a] for x, a in zip(args, axes) if a is not None)
    child, tape.children = tape.children, tape.children + 1
    inner = {} if tape.perturbations is None else {
        k: p for k, p in tape.perturbations.items() if tape.scopes[k][:1] == (child,)}
    scopes = {k: tape.scopes[k][1:] for k in inner}
    found = []

    def run(perturbations, *args):
      sub = _Tape((), tape.weights, None if tape.perturbations is None else perturbations,
                  scopes, index=tape.index)
      with sub:
        out = fn(*args)
      found.append(sub)
      return out, sub.inputs

    out, inputs = jax.vmap(run, (0, *axes))(inner, *args)
    sub = found[0]
    tape.twice |= sub.twice | (sub.found.keys() & tape.found.keys())
    tape.found.update((k, layer.under(size, child)) for k, layer in sub.found.items())
    tape.layer_norms |= sub.layer_norms
    tape.inputs.update(inputs)
    return out

  return mapped


def _reaches_output(jaxpr, count: int) -> list[bool]:
  """Whether the output of `jaxpr` can depend on each of its first `count` inputs.

  A forward pass over the equations; an equation's outputs depend on all of its inputs (an
  over-approximation inside calls: it can only send a covered layer to the fallback).
  """
  deps = {v: 1 << i for i, v in enumerate(jaxpr.invars[:count])}
  for eqn in jaxpr.eqns:
    mask = 0
    for v in eqn.invars:
      if not isinstance(v, jax_core.Literal):
        mask |= deps.get(v, 0)
    if mask:
      for v in eqn.outvars:
        deps[v] = mask
  reached = 0
  for v in jaxpr.outvars:
    if not isinstance(v, jax_core.Literal):
      reached |= deps.get(v, 0)
  return [bool(reached >> i & 1) for i in range(count)]


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def discover(loss_fn: Callable, params, *unit) -> Plan:
  """The plan of `loss_fn(params, *unit)` for one unit: traced, never run.

  Args:
    loss_fn: (params, *unit) -> the unit's scalar loss.
    params: the parameters (arrays, tracers or ShapeDtypeStructs).
    *unit: one unit's inputs (any of the same).

  Returns:
    The plan: every `nn.Dense`, `nn.DenseGeneral` and `nn.Embed` call is covered, unless its
    weights are read outside it or it runs more than once per unit.
  """
  leaves, treedef = jax.tree.flatten(params)
  tapes = []

  def traced(shadow, weights, *unit):
    with _Tape(shadow, weights) as tape, nn.intercept_methods(_intercept):
      out = loss_fn(jax.tree.unflatten(treedef, shadow), *unit)
    tapes.append(tape)
    return out

  abstract = _abstract(leaves)
  closed = jax.make_jaxpr(traced)(abstract, abstract, *_abstract(unit))
  read = _reaches_output(closed.jaxpr, len(leaves))  # read outside the covered calls
  tape = tapes[0]
  layers, reasons = [], {}
  for kernel, layer in sorted(tape.found.items()):
    weights = (kernel,) if layer.bias is None else (kernel, layer.bias)
    if kernel in tape.twice:
      reasons.update((i, "its layer runs more than once per example") for i in weights)
    elif any(read[i] for i in weights):
      reasons.update((i, "read outside its layer") for i in weights)
    else:
      layers.append(layer)
  covered = {i for l in layers for i in (l.kernel, l.bias) if i is not None}
  direct = tuple(i for i in range(len(leaves)) if i not in covered)
  for i in direct:
    if i not in reasons and i not in tape.layer_norms:
      reasons[i] = "no layer rule"
  names = tuple(jax.tree_util.keystr(path)
                for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  return Plan(layers=tuple(layers), direct=direct, names=names, reasons=reasons)


@dataclasses.dataclass(frozen=True)
class Parts:
  """What one backward pass gives for B units: every rule's per-unit factors.

  Attributes:
    direct: the fallback leaves' per-unit gradients, [B, *leaf shape] each (`Plan.direct`).
    inputs: kernel index -> the covered layer's per-unit input a, [B, ...].
    grads: kernel index -> the per-unit gradient of its output g, [B, ...].
  """

  direct: list
  inputs: dict
  grads: dict


def backward(plan: Plan, loss_fn: Callable, params, units, rngs,
             spmd_axis_name=mesh_lib.BATCH_AXES):
  """(losses [B], Parts) of B units from one forward and one backward pass.

  Args:
    plan: `discover(loss_fn, params, one unit, one rng)`.
    loss_fn: (params, unit, rng) -> the unit's scalar loss.
    params: the parameters.
    units: a pytree, leaves [B, ...].
    rngs: PRNG keys [B], or None.
    spmd_axis_name: the mesh axes the units are split over (None: the unit axis is not split,
      e.g. one group per micro-batch whose examples are).
  """
  leaves, treedef = jax.tree.flatten(params)
  size = jax.tree.leaves(units)[0].shape[0]
  scopes = {l.kernel: l.scope for l in plan.layers}

  def one(direct, perturbations, unit, rng):
    full = list(leaves)
    for i, leaf in zip(plan.direct, direct):
      full[i] = leaf
    with _Tape(full, full, perturbations, scopes) as tape, nn.intercept_methods(_intercept):
      loss = loss_fn(jax.tree.unflatten(treedef, full), unit, rng)
    return loss, tape.inputs

  direct = [jnp.broadcast_to(leaves[i], (size, *leaves[i].shape)) for i in plan.direct]
  perturbations = {l.kernel: jnp.zeros((size, *l.output.shape), l.output.dtype)
                   for l in plan.layers}
  batched = jax.vmap(one, spmd_axis_name=spmd_axis_name)
  losses, pullback, inputs = jax.vjp(lambda d, p: batched(d, p, units, rngs), direct,
                                     perturbations, has_aux=True)
  grads_direct, grads = pullback(jnp.ones_like(losses))
  return losses, Parts(direct=grads_direct, inputs=inputs, grads=grads)


def _rows(layer: Layer, a, g):
  """a [B, T, d] and g [B, T, p]: a unit's layer input and output gradient as token rows."""
  b = g.shape[0]
  if layer.kind == "embed":
    return a.reshape(b, -1), g.reshape(b, -1, layer.fan_out)
  axis = tuple(1 + x for x in layer.axis)
  a = jnp.moveaxis(a, axis, tuple(range(a.ndim - len(axis), a.ndim)))
  return a.reshape(b, -1, layer.fan_in), g.reshape(b, -1, layer.fan_out)


def _gram(x):
  return jnp.einsum("btd,bsd->bts", x, x, precision=_HIGHEST, preferred_element_type=_F32)


def _weight_grads(a, g):
  """Per-unit weight gradients a^T g, float32 [B, d, p] (the direct form: `squared_norms` and
  `clipped_sum` compute the same op, which the compiler computes once)."""
  return jnp.einsum("btd,btp->bdp", a, g, precision=_HIGHEST, preferred_element_type=_F32)


def _bias_grads(g):
  """Per-unit bias gradients sum_t g_t, float32 [B, p]."""
  return jnp.sum(g.astype(_F32), axis=1)


def _embedding_rows(ids, g, vocab: int):
  """Per-unit embedding gradients [B, vocab, width] (the direct form)."""
  return jax.vmap(lambda i, x: jnp.zeros((vocab, x.shape[-1]), _F32).at[i].add(x))(
      ids, g.astype(_F32))


def squared_norms(plan: Plan, parts: Parts) -> jax.Array:
  """Each unit's squared gradient norm, float32 [B]: the sum over every rule's parameters."""
  total = sum(jnp.sum(jnp.square(g.astype(_F32)), axis=tuple(range(1, g.ndim)))
              for g in parts.direct)
  for layer in plan.layers:
    a, g = _rows(layer, parts.inputs[layer.kernel], parts.grads[layer.kernel])
    if layer.kind == "embed":
      if layer.gram:
        same = a[:, :, None] == a[:, None, :]
        total += jnp.sum(jnp.where(same, _gram(g), 0.0), axis=(1, 2))
      else:
        total += jnp.sum(jnp.square(_embedding_rows(a, g, layer.fan_in)), axis=(1, 2))
      continue
    if layer.gram:
      total += jnp.einsum("bts,bts->b", _gram(a), _gram(g), precision=_HIGHEST)
    else:
      total += jnp.sum(jnp.square(_weight_grads(a, g)), axis=(1, 2))
    if layer.bias is not None:
      total += jnp.sum(jnp.square(_bias_grads(g)), axis=1)
  return total


def clipped_sum(plan: Plan, params, parts: Parts, keep, factors):
  """sum_i factors_i * grad_i in float32, shaped like `params`; units where `keep` is False
  contribute exactly zero (their inputs and gradients are replaced, never multiplied by 0).

  Args:
    plan: the plan.
    params: the parameters (their structure and shapes).
    parts: `backward`'s.
    keep: bool [B].
    factors: float32 [B], each unit's clip factor min(1, C / norm).
  """
  leaves, treedef = jax.tree.flatten(params)
  out = [None] * len(leaves)
  factors = jnp.where(keep, factors, 0.0)  # a dropped unit's factor may be NaN

  def zeroed(x):
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

  for i, g in zip(plan.direct, parts.direct):
    out[i] = jnp.einsum("b...,b->...", zeroed(g.astype(_F32)), factors, precision=_HIGHEST)
  for layer in plan.layers:
    a, g = _rows(layer, parts.inputs[layer.kernel], parts.grads[layer.kernel])
    if layer.bias is not None:
      b = jnp.einsum("bp,b->p", zeroed(_bias_grads(g)), factors, precision=_HIGHEST)
      out[layer.bias] = b.reshape(leaves[layer.bias].shape)
    if layer.kind == "dense" and not layer.gram:  # the per-unit gradients are at hand
      w = jnp.einsum("bdp,b->dp", zeroed(_weight_grads(a, g)), factors, precision=_HIGHEST)
      out[layer.kernel] = w.reshape(leaves[layer.kernel].shape)
      continue
    g = zeroed(g.astype(_F32)) * factors[:, None, None]
    if layer.kind == "embed":
      table = jnp.zeros((layer.fan_in, layer.fan_out), _F32)
      out[layer.kernel] = table.at[a.reshape(-1)].add(g.reshape(-1, layer.fan_out))
      continue
    w = jnp.einsum("btd,btp->dp", zeroed(a).astype(_F32), g, precision=_HIGHEST)
    out[layer.kernel] = w.reshape(leaves[layer.kernel].shape)
  return jax.tree.unflatten(treedef, out)


def one_unit(tree: Any, axes: int = 2):
  """The abstract value of one unit of a [num_micro, micro, ...] pytree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[axes:], x.dtype), tree)
