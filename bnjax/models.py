"""Models built from bnjax's layers: an `MLP` with a batch-norm placement option, the article's model.

`MLP` stacks `Dense` layers with batch normalization before the activation (Ioffe & Szegedy, 2015),
after it, or not at all.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from bnjax._src import checks
from bnjax.nn import BatchNorm

__all__ = ["MLP", "keras_article_model"]

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
      x = linen.Dense(
        width, use_bias=dense_bias, kernel_init=self.kernel_init, dtype=self.dtype, name=f"Dense_{i}"
      )(x)
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
