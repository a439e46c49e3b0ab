"""Models built from bnjax's layers, and their inference form.

`MLP` stacks `Dense` layers with batch normalization before the activation (Ioffe & Szegedy, 2015),
after it, or not at all; `ConvNet` stacks convolution, batch norm and ReLU blocks. After training,
`fold_batch_norm` (linen) and `fold_batch_norm_nnx` (nnx) fold every eval-mode batch norm into the
neighbouring Dense or convolution, and `export_inference` serializes the result with `jax.export`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from flax import nnx

from bnjax import nnx as bnjax_nnx
from bnjax._src import checks
from bnjax._src import inference
from bnjax._src import types
from bnjax.nn import BatchNorm

__all__ = ["MLP", "ConvNet", "keras_article_model", "fold_batch_norm", "fold_batch_norm_nnx", "export_inference"]

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

_NORM_PLACEMENTS = (None, "pre", "post")


class MLP(linen.Module):
  r"""A multilayer perceptron with optional batch normalization before or after each hidden activation.

  `features = (h_0, ..., h_{L-1}, out)`: hidden layer `i` computes, for the placement `norm`,

      None:   a_i = act(Dense_i(a_{i-1}))
      "pre":  a_i = act(BatchNorm_i(Dense_i(a_{i-1})))    Dense_i has no bias: BN's bias replaces it
      "post": a_i = BatchNorm_i(act(Dense_i(a_{i-1})))

  ("pre" is the paper's placement, BN(Wu) in Section 3.2), and the last layer gives the logits
  `Dense_L(a_{L-1})`, passed through `output_activation` when one is given. Only the hidden layers listed
  in `norm_layers` (default: all) get a BatchNorm; the others are plain `act(Dense_i(.))` with a bias.

  Submodules are named by layer index: `Dense_0` ... `Dense_L` and `BatchNorm_i` for each normalized hidden
  layer `i` (so with `norm_layers=(1,)` the only one is `BatchNorm_1`). The input of each hidden
  activation is sown as `intermediates/preact_{i}` (read it with `mutable=["intermediates"]`; flax's `sow`
  stores a one-element tuple), e.g. to follow the distribution of a sigmoid's input over training.
  Inputs of any shape `(N, ...)` are flattened to `(N, -1)`.

  Attributes:
    features: hidden sizes followed by the output size (at least one entry).
    activation: the hidden activation.
    norm: None, "pre" or "post".
    norm_layers: indices of the hidden layers that get a BatchNorm (negative ones count from the last
      hidden layer); None means all hidden layers.
    momentum, epsilon, axis_name: passed to each `bnjax.nn.BatchNorm`.
    kernel_init: the Dense kernels' initializer (flax's default, LeCun normal).
    dtype: the computation dtype of the Dense and BatchNorm layers (None: inferred, as in flax).
    output_activation: applied to the logits when given.
    unbiased_running_var: each BatchNorm stores `m / (m - 1) * var` in its running variance (the paper's
      Algorithm 2, PyTorch's convention).

  Reference: S. Ioffe, C. Szegedy, "Batch Normalization", ICML 2015, Section 3.2.
  """

  features: Sequence[int]
  activation: Callable[[Array], Array] = linen.relu
  norm: str | None = None
  norm_layers: Sequence[int] | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  kernel_init: Initializer = linen.linear.default_kernel_init
  dtype: Dtype | None = None
  output_activation: Callable[[Array], Array] | None = None
  unbiased_running_var: bool = False

  def __post_init__(self):
    features = self.features
    if isinstance(features, (int, np.integer)) or not isinstance(features, Sequence) or not features:
      raise TypeError(f"features must be a non-empty sequence of positive ints, got {features!r}")
    for f in features:
      if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"features must be a non-empty sequence of positive ints, got {features!r}")
    if self.norm not in _NORM_PLACEMENTS:
      raise ValueError(f"norm must be one of None, 'pre', 'post', got {self.norm!r}")
    self._normalized_layers()  # validates norm_layers
    if not callable(self.activation):
      raise TypeError(f"activation must be callable, got {self.activation!r}")
    if self.output_activation is not None and not callable(self.output_activation):
      raise TypeError(f"output_activation must be callable or None, got {self.output_activation!r}")
    checks.check_decay(self.momentum, arg="momentum")
    checks.check_epsilon(self.epsilon)
    checks.axis_names(self.axis_name)
    super().__post_init__()

  def _normalized_layers(self) -> frozenset[int]:
    """The indices of the hidden layers that get a BatchNorm."""
    num_hidden = len(self.features) - 1
    if self.norm_layers is None:
      return frozenset(range(num_hidden)) if self.norm is not None else frozenset()
    layers = self.norm_layers
    if isinstance(layers, (int, np.integer)) or not isinstance(layers, Sequence):
      raise TypeError(f"norm_layers must be a sequence of hidden-layer indices or None, got {layers!r}")
    if self.norm is None and len(layers):
      raise ValueError(f"norm_layers={layers!r} needs norm='pre' or 'post', got norm=None")
    indices = set()
    for i in layers:
      if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"norm_layers must hold ints, got {layers!r}")
      if not -num_hidden <= i < num_hidden:
        raise ValueError(
          f"norm_layers={layers!r} has index {i}, out of range for {num_hidden} hidden layers "
          f"(features={tuple(self.features)!r}; the last entry is the output layer, which is never normalized)"
        )
      indices.add(int(i) % num_hidden)
    return frozenset(indices)

  @linen.compact
  def __call__(self, x, *, train: bool):
    """Applies the network.

    Args:
      x: inputs of shape `(N, ...)`, flattened to `(N, -1)`.
      train: True normalizes with batch statistics and updates `batch_stats` (apply with
        `mutable=["batch_stats"]`); False uses the running statistics.

    Returns:
      `(N, features[-1])` logits (after `output_activation` when given).
    """
    if not isinstance(train, (bool, np.bool_)):
      raise TypeError(f"train must be True or False, got {train!r}")
    x = jnp.asarray(x)
    if x.ndim < 1:
      raise ValueError(f"x must have a batch axis, got a scalar of shape {x.shape}")
    x = x.reshape((x.shape[0], -1))
    normalized = self._normalized_layers()
    for i, width in enumerate(self.features[:-1]):
      has_norm = i in normalized
      dense_bias = not (has_norm and self.norm == "pre")
      x = linen.Dense(width, use_bias=dense_bias, kernel_init=self.kernel_init, dtype=self.dtype, name=f"Dense_{i}")(x)
      if has_norm and self.norm == "pre":
        x = self._batch_norm(i, train)(x)
      self.sow("intermediates", f"preact_{i}", x)
      x = self.activation(x)
      if has_norm and self.norm == "post":
        x = self._batch_norm(i, train)(x)
    last = len(self.features) - 1
    x = linen.Dense(self.features[-1], kernel_init=self.kernel_init, dtype=self.dtype, name=f"Dense_{last}")(x)
    if self.output_activation is not None:
      x = self.output_activation(x)
    return x

  def _batch_norm(self, i: int, train: bool) -> BatchNorm:
    return BatchNorm(
      use_running_average=not train,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis_name=self.axis_name,
      dtype=self.dtype,
      unbiased_running_var=self.unbiased_running_var,
      name=f"BatchNorm_{i}",
    )


def keras_article_model(batch_norm: bool = True, *, momentum: float = 0.99, epsilon: float = 1e-3) -> MLP:
  """The Keras model of the batch-normalization article, as an `MLP` over 5 input features.

  Keras original (two classes, softmax output):

      Dense(16, activation='relu') -> Dense(32, activation='relu') -> BatchNormalization -> Dense(2, 'softmax')

  Here the last layer gives logits (the loss applies the softmax), i.e. `MLP((16, 32, 2), relu,
  norm="post", norm_layers=(1,))`: `Dense_0 (5->16)`, `Dense_1 (16->32)`, `BatchNorm_1 (32)`, `Dense_2
  (32->2)`, 770 parameters and 64 running statistics for 5 input features. The defaults are Keras's
  `BatchNormalization` defaults (momentum 0.99, epsilon 1e-3). The article writes `input_shape=(1, 5)` with
  `BatchNormalization(axis=1)`, which would normalize a size-1 axis; this model normalizes the 32 features
  of the hidden layer, which is what the article describes. `batch_norm=False` drops the BatchNorm.
  """
  checks.check_bool(batch_norm, "batch_norm")
  if batch_norm:
    return MLP((16, 32, 2), activation=linen.relu, norm="post", norm_layers=(1,), momentum=momentum, epsilon=epsilon)
  return MLP((16, 32, 2), activation=linen.relu, norm=None, momentum=momentum, epsilon=epsilon)


def _check_positive_ints(value, arg: str) -> None:
  if isinstance(value, (int, np.integer)) or not isinstance(value, Sequence) or not value:
    raise TypeError(f"`{arg}` must be a non-empty sequence of positive ints, got {value!r}.")
  for v in value:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"`{arg}` must be a non-empty sequence of positive ints, got {value!r}.")


def _check_positive_int(value, arg: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"`{arg}` must be a positive int, got {value!r}.")


class ConvNet(linen.Module):
  r"""A small convolutional classifier: convolution, batch norm and ReLU blocks, then a Dense layer.

  For NHWC inputs `(N, H, W, C)` (any number of spatial axes: `(N, *spatial, C)`), block `i` computes

      norm=True:   x = relu(BatchNorm_i(Conv_i(x)))     Conv_i has no bias: BN's bias replaces it
      norm=False:  x = relu(Conv_i(x))

  with `channels[i]` output channels, a 3-wide kernel along each spatial axis and SAME padding; block 0
  keeps the resolution and each later block moves by `stride`. The logits are `Dense_0` of the spatial
  mean (global average pooling) of the last block, `(N, num_classes)`.

  Submodules: `Conv_0` ... `Conv_{B-1}`, `BatchNorm_i` for each block when `norm`, `Dense_0`.

  Attributes:
    channels: the output channels of each block (at least one block).
    num_classes: the number of logits.
    norm: a `bnjax.nn.BatchNorm` after each convolution.
    stride: the stride of every block after the first (2 halves the resolution).
    momentum: passed to each `bnjax.nn.BatchNorm`.
    epsilon: passed to each `bnjax.nn.BatchNorm`.
    axis_name: passed to each `bnjax.nn.BatchNorm`.
    dtype: the computation dtype of every layer (None: inferred, as in flax).
  """

  channels: Sequence[int] = (16, 32)
  num_classes: int = 10
  norm: bool = True
  stride: int = 2
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype | None = None

  def __post_init__(self):
    _check_positive_ints(self.channels, "channels")
    _check_positive_int(self.num_classes, "num_classes")
    _check_positive_int(self.stride, "stride")
    checks.check_bool(self.norm, "norm")
    checks.check_decay(self.momentum, arg="momentum")
    checks.check_epsilon(self.epsilon)
    checks.axis_names(self.axis_name)
    super().__post_init__()

  @linen.compact
  def __call__(self, x, *, train: bool):
    """Applies the network.

    Args:
      x: inputs `(N, *spatial, C)`, at least one spatial axis.
      train: True normalizes with batch statistics and updates `batch_stats` (apply with
        `mutable=["batch_stats"]`); False uses the running statistics.

    Returns:
      `(N, num_classes)` logits.
    """
    checks.check_bool(train, "train")
    x = jnp.asarray(x)
    if x.ndim < 3:
      raise ValueError(f"`x` must be (N, *spatial, C) with at least one spatial axis, got shape {x.shape}.")
    spatial = x.ndim - 2
    for i, width in enumerate(self.channels):
      x = linen.Conv(
        width,
        (3,) * spatial,
        strides=1 if i == 0 else self.stride,
        padding="SAME",
        use_bias=not self.norm,
        dtype=self.dtype,
        name=f"Conv_{i}",
      )(x)
      if self.norm:
        x = BatchNorm(
          use_running_average=not train,
          momentum=self.momentum,
          epsilon=self.epsilon,
          axis_name=self.axis_name,
          dtype=self.dtype,
          name=f"BatchNorm_{i}",
        )(x)
      x = linen.relu(x)
    x = jnp.mean(x, axis=tuple(range(1, 1 + spatial)))
    return linen.Dense(self.num_classes, dtype=self.dtype, name="Dense_0")(x)


# ------------------------------------------------------------------------------------------------------
# Folding and export
# ------------------------------------------------------------------------------------------------------


def _lookup(variables, collection: str, layer: str) -> dict:
  try:
    return dict(variables[collection][layer])
  except (KeyError, TypeError) as e:
    raise ValueError(
      f"`variables` has no {collection}/{layer}: expected the variables of the model (from `model.init` or "
      "training, with their `batch_stats`)."
    ) from e


def _norm_of(variables, layer: str) -> tuple[types.BatchNormParams, types.BatchStats]:
  params = _lookup(variables, "params", layer)
  stats = _lookup(variables, "batch_stats", layer)
  if "mean" not in stats or "var" not in stats:
    raise ValueError(f"`variables` has no batch_stats/{layer}/mean and var, got keys {sorted(stats)}.")
  return types.BatchNormParams(params.get("scale"), params.get("bias")), types.BatchStats(stats["mean"], stats["var"])


def _folded(fold, layer: str, *args, **kwargs) -> dict:
  try:
    kernel, bias = fold(*args, **kwargs)
  except ValueError as e:
    raise ValueError(f"`variables` for {layer}: {e}") from e
  return {"kernel": kernel, "bias": bias}


def fold_batch_norm(model: MLP | ConvNet, variables) -> tuple[MLP | ConvNet, dict]:
  r"""The model without batch norm, and its variables, equal to `model` in evaluation mode.

  Each eval-mode batch norm `z -> a * (z - mean) + beta`, `a = scale / sqrt(var + epsilon)`, is an
  affine map, folded into a neighbouring layer (`bnjax.fold_dense`, `bnjax.fold_conv`):

  * `MLP(norm="pre")` and `ConvNet`: `BatchNorm_i` follows `Dense_i` / `Conv_i` and folds into its kernel
    and bias (the folded layer gets a bias);
  * `MLP(norm="post")`: `BatchNorm_i` follows the activation, so it folds into the next layer:
    `Dense_{i+1}(a * h + c) = h (a[:, None] * W) + (c W + b)` with `c = beta - mean * a`.

  The result is the same model with `norm=None` (`MLP`) or `norm=False` (`ConvNet`): its layers keep their
  names, its variables hold only `params`, and `folded.apply(folded_variables, x, train=False)` equals
  `model.apply(variables, x, train=False)` to float32 rounding. It has no training mode any more.

  Args:
    model: an `MLP` or a `ConvNet` (e.g. `keras_article_model()`).
    variables: its variables, with `params` and `batch_stats` (the running statistics used).

  Returns:
    `(folded_model, folded_variables)`.

  Raises:
    TypeError: a model of another class.
    ValueError: variables that lack a layer of the model, or whose shapes do not match each other.
  """
  if isinstance(model, MLP):
    normalized = model._normalized_layers()
    params = {f"Dense_{i}": _lookup(variables, "params", f"Dense_{i}") for i in range(len(model.features))}
    for i in sorted(normalized):
      norm_params, stats = _norm_of(variables, f"BatchNorm_{i}")
      # A pre-activation norm folds into the Dense before it, a post-activation one into the Dense after it.
      fold, name = (
        (inference.fold_dense, f"Dense_{i}") if model.norm == "pre" else (inference.fold_dense_input, f"Dense_{i + 1}")
      )
      dense = params[name]
      params[name] = _folded(fold, name, dense["kernel"], dense.get("bias"), norm_params, stats, epsilon=model.epsilon)
    return model.clone(parent=None, norm=None, norm_layers=None), {"params": params}
  if isinstance(model, ConvNet):
    params = {"Dense_0": _lookup(variables, "params", "Dense_0")}
    for i in range(len(model.channels)):
      conv = _lookup(variables, "params", f"Conv_{i}")
      if model.norm:
        norm_params, stats = _norm_of(variables, f"BatchNorm_{i}")
        conv = _folded(
          inference.fold_conv, f"Conv_{i}", conv["kernel"], conv.get("bias"), norm_params, stats, epsilon=model.epsilon
        )
      params[f"Conv_{i}"] = conv
    return model.clone(parent=None, norm=False), {"params": params}
  raise TypeError(
    f"`model` must be a bnjax.models.MLP or ConvNet, got {type(model).__name__}; for other models fold each "
    "layer with bnjax.fold_dense / bnjax.fold_conv, or build them in nnx and use fold_batch_norm_nnx."
  )


_NNX_NORMS = (bnjax_nnx.BatchNorm, nnx.BatchNorm)
_NNX_LAYERS = (nnx.Linear, nnx.Conv)


class _FoldedBatchNorm(nnx.Module):
  """What `fold_batch_norm_nnx(..., pairs=...)` leaves in place of a folded batch norm: the identity."""

  def __call__(self, x, *args, **kwargs):
    return x


def _norm_arrays(norm, where: str) -> tuple[types.BatchNormParams, types.BatchStats]:
  if norm.axis not in (-1, (-1,), [-1]):
    raise ValueError(
      f"{where} normalizes axis={norm.axis!r}; only a batch norm over the last axis (axis=-1, the features "
      "of a Linear or of an NHWC Conv) folds."
    )
  params = types.BatchNormParams(
    None if norm.scale is None else norm.scale[...], None if norm.bias is None else norm.bias[...]
  )
  return params, types.BatchStats(norm.mean[...], norm.var[...])


def _set_kernel_and_bias(layer, kernel, bias) -> None:
  layer.kernel[...] = kernel
  if layer.bias is None:
    layer.bias = nnx.Param(bias)
    layer.use_bias = True
  else:
    layer.bias[...] = bias


def _fold_into(layer, norm, where: str, fold) -> None:
  """Replaces `layer`'s kernel and bias by `fold(kernel, bias, params, stats)` of `norm`'s variables."""
  params, stats = _norm_arrays(norm, where)
  bias = None if layer.bias is None else layer.bias[...]
  try:
    kernel, bias = fold(layer.kernel[...], bias, params, stats, epsilon=norm.epsilon)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  _set_kernel_and_bias(layer, kernel, bias)


def _fold_after(layer, norm, where: str) -> None:
  """Folds `norm`, applied to `layer`'s output, into `layer`."""
  _fold_into(layer, norm, where, inference.fold_conv)


def _fold_before(norm, layer, where: str) -> None:
  """Folds `norm` into the Linear `layer` applied to its output."""
  if not isinstance(layer, nnx.Linear):
    raise ValueError(
      f"{where} is followed by a {type(layer).__name__}: a batch norm folds into the next layer only when "
      "that is an nnx.Linear (a convolution's zero padding is not normalized, so the fold would be wrong at "
      "the borders)."
    )
  _fold_into(layer, norm, where, inference.fold_dense_input)


def _fold_sequential(seq: nnx.Sequential, where: str) -> None:
  layers = list(seq.layers)
  uses = collections.Counter(id(f) for f in layers)

  def used_once(i: int) -> bool:
    if uses[id(layers[i])] > 1:
      raise ValueError(f"{where}.layers[{i}] is used more than once in the Sequential; a fold would change each use.")
    return True

  kept = []
  for i, f in enumerate(layers):
    name = f"{where}.layers[{i}]"
    if isinstance(f, nnx.Sequential):
      _fold_sequential(f, name)
    if not isinstance(f, _NNX_NORMS):
      kept.append(f)
      continue
    previous = layers[i - 1] if i > 0 else None
    following = layers[i + 1] if i + 1 < len(layers) else None
    if isinstance(previous, _NNX_LAYERS) and used_once(i - 1):
      _fold_after(previous, f, name)
    elif following is not None and not isinstance(following, _NNX_NORMS) and used_once(i + 1):
      _fold_before(f, following, name)
    else:
      around = ", ".join(type(g).__name__ if g is not None else "nothing" for g in (previous, following))
      raise ValueError(
        f"{name} is a batch norm between {around}: it folds into an nnx.Linear or nnx.Conv right before it, "
        "or an nnx.Linear right after it."
      )
  seq.layers = nnx.List(kept)


def _keys(path, arg: str) -> list[str | int]:
  if not isinstance(path, str) or not path:
    raise TypeError(f"`{arg}` must be a dotted attribute path such as 'block.conv', got {path!r}.")
  return [int(part) if part.isdigit() else part for part in path.split(".")]


def _child(node: Any, key: str | int) -> Any:
  return node[key] if isinstance(key, int) else getattr(node, key)


def _resolve(model: Any, path, arg: str) -> Any:
  """The submodule at a dotted path such as `"blocks.0.conv"`."""
  node = model
  for key in _keys(path, arg):
    try:
      node = _child(node, key)
    except (AttributeError, IndexError, KeyError, TypeError) as e:
      raise ValueError(f"`{arg}`={path!r}: the model has no {key!r} there.") from e
  return node


def _replace(model: Any, path: str, new: Any) -> None:
  """Puts `new` at a path `_resolve` has found."""
  *parents, last = _keys(path, "path")
  parent = model
  for key in parents:
    parent = _child(parent, key)
  if isinstance(last, int):
    parent[last] = new
  else:
    setattr(parent, last, new)


def fold_batch_norm_nnx(model: nnx.Module, pairs: Sequence[tuple[str, str]] | None = None) -> nnx.Module:
  r"""A copy of an nnx model with every batch norm folded into a neighbouring `nnx.Linear` or `nnx.Conv`.

  An nnx module's graph does not say in which order `__call__` uses its submodules, so the neighbours
  come from one of two places:

  * `pairs=None`: `model` is an `nnx.Sequential` (nested ones are walked too). A batch norm
    (`bnjax.nnx.BatchNorm` or `flax.nnx.BatchNorm`) right after an `nnx.Linear` or `nnx.Conv` folds into
    that layer's kernel and bias (`bnjax.fold_conv`); otherwise one right before an `nnx.Linear` folds
    into that layer's input side, `(a * h + c) W + b = h (a[:, None] * W) + (c W + b)`. The batch norms
    leave the Sequential's `layers`.
  * `pairs=[(first, second), ...]`: dotted attribute paths (`"block.conv"`, `"layers.0"`) of two
    submodules that `model` applies one right after the other, the second on the first's output and
    nothing else using that output: `(layer, norm)` folds the norm into the layer, `(norm, linear)` into
    the Linear. Each folded norm is replaced by an identity module. Nothing here can check the order:
    compare the outputs on an example batch.

  Each batch norm must normalize the last axis (`axis=-1`). The copy computes `model`'s evaluation-mode
  outputs (the running statistics) to float32 rounding; `model` itself is left unchanged.

  Args:
    model: the trained nnx module.
    pairs: None for an `nnx.Sequential`, else the `(first, second)` paths to fold.

  Returns:
    The folded copy, with no batch norm left.

  Raises:
    TypeError: `model` is not an nnx module, or `pairs=None` for a module that is not an `nnx.Sequential`.
    ValueError: a batch norm with no foldable neighbour, a path that names no submodule or the wrong kinds
      of layers, mismatched shapes, or a batch norm left over that `pairs` does not name.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
  model = nnx.clone(model)
  if pairs is None:
    if not isinstance(model, nnx.Sequential):
      raise TypeError(
        f"`model` is a {type(model).__name__}, not an nnx.Sequential: its call order is unknown, so name "
        "the layers to fold with `pairs=[('conv', 'bn'), ...]`."
      )
    _fold_sequential(model, "model")
  else:
    for n, pair in enumerate(pairs):
      if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"`pairs[{n}]` must be a (first, second) pair of paths, got {pair!r}.")
      first = _resolve(model, pair[0], f"pairs[{n}][0]")
      second = _resolve(model, pair[1], f"pairs[{n}][1]")
      where = f"`pairs[{n}]`={tuple(pair)!r}"
      if isinstance(first, _NNX_LAYERS) and isinstance(second, _NNX_NORMS):
        _fold_after(first, second, where)
        norm_path = pair[1]
      elif isinstance(first, _NNX_NORMS) and isinstance(second, _NNX_LAYERS):
        _fold_before(first, second, where)
        norm_path = pair[0]
      else:
        raise ValueError(
          f"{where} names a {type(first).__name__} and a {type(second).__name__}: expected an nnx.Linear or "
          "nnx.Conv and then a batch norm, or a batch norm and then an nnx.Linear."
        )
      _replace(model, norm_path, _FoldedBatchNorm())
  for path, node in nnx.iter_graph(model):
    if isinstance(node, _NNX_NORMS):
      where = ".".join(str(p) for p in path)
      raise ValueError(
        f"model.{where} is a batch norm that was not folded: "
        + (
          "it sits inside a module that is not an nnx.Sequential, whose call order is unknown; name it in `pairs`."
          if pairs is None
          else "name it in `pairs`."
        )
      )
  return model


def export_inference(model: MLP | ConvNet, variables, example_x, *, symbolic_batch: bool = True, fold: bool = True):
  """The model's evaluation-mode forward pass, weights included, exported with `jax.export` (StableHLO).

  `exported.serialize()` gives bytes to store; `jax.export.deserialize(data).call(x)` runs them in any
  process, no model code needed. The weights are constants of the exported module.

  Args:
    model: an `MLP` or a `ConvNet` (with `fold=False`, any linen module applied as
      `model.apply(variables, x, train=False)`).
    variables: the model's trained variables.
    example_x: an input (or a `jax.ShapeDtypeStruct`) giving the shape and dtype; its first axis is the batch.
    symbolic_batch: export for any batch size (the first axis a symbolic dimension `b`) instead of the
      example's.
    fold: fold the batch norms first (`fold_batch_norm`).

  Returns:
    A `jax.export.Exported`.

  Raises:
    TypeError: a model `fold_batch_norm` does not know (with `fold=True`), or a non-bool option.
    ValueError: an `example_x` without a batch axis, or variables that do not fit the model.
  """
  checks.check_bool(symbolic_batch, "symbolic_batch")
  checks.check_bool(fold, "fold")
  shape = tuple(np.shape(example_x))
  dtype = example_x.dtype if hasattr(example_x, "dtype") else jnp.result_type(example_x)
  if not shape:
    raise ValueError(f"`example_x` must have a batch axis, got a scalar of shape {shape}.")
  if fold:
    model, variables = fold_batch_norm(model, variables)

  def infer(x):
    return model.apply(variables, x, train=False)

  if symbolic_batch:
    shape = (*jax.export.symbolic_shape("b"), *shape[1:])
  return jax.export.export(jax.jit(infer))(jax.ShapeDtypeStruct(shape, dtype))
