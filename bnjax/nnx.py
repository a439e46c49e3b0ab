"""A flax.nnx `BatchNorm` on the bnjax core, a drop-in for `flax.nnx.BatchNorm`.

    from flax import nnx
    bn = bnjax.nnx.BatchNorm(64, momentum=0.9, rngs=nnx.Rngs(0))     # was: nnx.BatchNorm(64, ...)

The layer holds flax's variables (`scale`, `bias`: `nnx.Param`; `mean`, `var`: `nnx.BatchStat`, same
shapes and dtypes), so `nnx.state` of one loads into the other, and follows flax's train / eval convention
(`model.train()`, `model.eval()`, `nnx.view(model, use_running_average=...)`, or the call argument).
"""

from __future__ import annotations

import math
import typing as tp
from collections.abc import Mapping
from collections.abc import Sequence
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers

import bnjax
from bnjax._src import checks

__all__ = ["BatchNorm"]

Array = jax.Array
Dtype = tp.Any
Initializer = tp.Callable[..., Array]

_RUNNING_AVERAGE_MISSING = (
  "No `use_running_average` was given to bnjax.nnx.BatchNorm: pass it to the constructor "
  "(`BatchNorm(..., use_running_average=True/False)`), to the call (`bn(x, use_running_average=...)`), "
  "or set it with `model.train()` / `model.eval()` / `nnx.view(model, use_running_average=...)`."
)


def _check_num_features(num_features: tp.Any) -> tuple[int, ...]:
  """The variables' shape: `(num_features,)` for an int, the tuple itself for a sequence of ints."""
  if isinstance(num_features, (int, np.integer)) and not isinstance(num_features, bool):
    shape = (int(num_features),)
  elif (
    isinstance(num_features, Sequence)
    and num_features
    and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in num_features)
  ):
    shape = tuple(int(n) for n in num_features)
  else:
    raise TypeError(f"num_features must be a positive int (or a tuple of positive ints), got {num_features!r}")
  if any(n < 1 for n in shape):
    raise ValueError(f"num_features must be positive, got {num_features!r}")
  return shape


class BatchNorm(nnx.Module):
  r"""Batch normalization (Ioffe & Szegedy, 2015), a drop-in for `flax.nnx.BatchNorm`.

  Training mode (`use_running_average=False`, flax's default here) normalizes with the batch's statistics
  over every axis except `axis`,

      y = scale * (x - mu_B) / sqrt(sigma_B^2 + epsilon) + bias,

  and moves the running statistics `running = momentum * running + (1 - momentum) * batch`; evaluation
  mode normalizes with the running `mean` and `var`. The statistics and the normalization are
  `bnjax.batch_norm`'s (float32 moments, exact variance, closed-form backward pass); the
  running statistics carry no gradient.

  Variables, as in flax: `scale`, `bias` (`nnx.Param`, `param_dtype`, absent (None) when disabled) and
  `mean` (zeros), `var` (ones) (`nnx.BatchStat`, float32), all of shape `(num_features,)`. With several
  feature axes (`axis=(1, 2)`), `num_features` is the product of their sizes, as flax requires, and the
  variables are the flattened feature array; a tuple `num_features` gives them that shape instead.

  Differences from flax, on purpose: the variance is always the stable one (`use_fast_variance` is
  accepted and ignored, so outputs match `flax.nnx.BatchNorm(use_fast_variance=False)`); a `mask` may
  also have x's shape without the feature axes (whole rows), besides flax's broadcastable per-element
  form; `epsilon` must be > 0; keyword-only extras `virtual_batch_size` (ghost batch norm),
  `unbiased_running_var` (running variance `m / (m - 1) * var`, as in the paper's Algorithm 2) and
  `running` (`"ema"`; `"ema_debiased"` and `"cumulative"` add an int32 `count` `nnx.BatchStat`) default
  to flax's behaviour.

  Args:
    num_features: the number of features (size of the feature axis, or the product over feature axes).
    use_running_average: if True, normalize with the running statistics; the call argument, when given,
      takes precedence. `model.train()` / `model.eval()` set it to False / True.
    axis: the feature axis or axes (int or sequence of ints), e.g. -1 for NHWC, 1 for NCHW.
    momentum: decay of the running averages (bnjax's `decay`).
    epsilon: added to the variance inside the square root.
    dtype: the computation and output dtype (default: promoted from the input and the variables, by
      `promote_dtype`, as flax does).
    param_dtype: the dtype of `scale` and `bias`.
    use_bias: learn `bias` (beta).
    use_scale: learn `scale` (gamma).
    bias_init: the initializer of `bias` (zeros).
    scale_init: the initializer of `scale` (ones).
    axis_name: the mapped axis (pmap, shard_map, vmap) over which batch statistics are synchronised.
    axis_index_groups: subsets of that axis's devices that are synchronised separately.
    use_fast_variance: accepted for compatibility; bnjax always uses the stable variance.
    promote_dtype: flax's dtype promotion of `(x, mean, var, scale, bias)`; the promoted input, scale
      and bias are normalized, while the running statistics stay float32.
    rngs: the `nnx.Rngs` whose `params` stream feeds the initializers.
    bias_metadata: metadata of the `bias` `nnx.Param`.
    scale_metadata: metadata of the `scale` `nnx.Param`.
    virtual_batch_size: ghost batch size, or None for the whole batch.
    unbiased_running_var: store the unbiased batch variance in the running variance.
    running: the running-statistics rule, one of `bnjax.RUNNING_RULES`.

  Reference: S. Ioffe, C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift", ICML 2015.
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int | Sequence[int] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros_init(),
    scale_init: Initializer = initializers.ones_init(),
    axis_name: str | None = None,
    axis_index_groups: tp.Any = None,
    use_fast_variance: bool = True,
    promote_dtype: tp.Callable[..., tp.Any] = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, tp.Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, tp.Any] = MappingProxyType({}),
    virtual_batch_size: int | None = None,
    unbiased_running_var: bool = False,
    running: str = "ema",
  ):
    feature_shape = _check_num_features(num_features)
    checks.layer_options(
      use_running_average=use_running_average,
      axis=axis,
      momentum=momentum,
      epsilon=epsilon,
      use_bias=use_bias,
      use_scale=use_scale,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      use_fast_variance=use_fast_variance,
      virtual_batch_size=virtual_batch_size,
      unbiased_running_var=unbiased_running_var,
      running=running,
    )
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")

    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    # Only the non-default running rules need a batch counter: the default layout stays flax's.
    self.count: nnx.BatchStat[Array] | None
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if running != "ema" else nnx.data(None)
    self.scale: nnx.Param[Array] | None
    self.bias: nnx.Param[Array] | None
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
    else:
      self.scale = nnx.data(None)
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)

    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.virtual_batch_size = virtual_batch_size
    self.unbiased_running_var = unbiased_running_var
    self.running = running

  def __call__(self, x, use_running_average: bool | None = None, *, mask: Array | None = None):
    """Normalizes `x` with the batch's statistics (training) or the running ones (evaluation).

    Args:
      x: the input; its feature axes hold `num_features` values in all.
      use_running_average: overrides the attribute for this call when given.
      mask: boolean, True for the rows that count in the statistics; only used in training mode.

    Returns:
      The normalized input, x's shape, in the promoted dtype.
    """
    use_running_average = first_from(use_running_average, self.use_running_average, error_msg=_RUNNING_AVERAGE_MISSING)
    checks.check_bool(use_running_average, "use_running_average")
    x = jnp.asarray(x)
    feature_axes = checks.feature_axes(self.axis, x.ndim)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    stored_shape = self.mean[...].shape
    if math.prod(feature_shape) != math.prod(stored_shape):
      raise ValueError(
        f"x has shape {x.shape}, whose feature axes {feature_axes} hold {feature_shape} = "
        f"{math.prod(feature_shape)} features, but num_features={self.num_features!r}"
      )

    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, _, _, scale, bias = self.promote_dtype((x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)

    def to_features(v):
      return None if v is None else v.reshape(feature_shape)

    stats = bnjax.BatchStats(
      mean=self.mean[...].reshape(feature_shape),
      var=self.var[...].reshape(feature_shape),
      count=None if self.count is None else self.count[...],
    )
    train = not use_running_average
    y, new_stats = bnjax.batch_norm(
      x,
      bnjax.BatchNormParams(scale=to_features(scale), bias=to_features(bias)),
      stats,
      train=train,
      axis=feature_axes,
      decay=self.momentum,
      epsilon=self.epsilon,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      mask=mask,
      virtual_batch_size=self.virtual_batch_size,
      unbiased_running_var=self.unbiased_running_var,
      running=self.running,
      allow_batch_of_one=True,
    )
    if train:
      # The running statistics are state, not a function to differentiate through.
      self.mean[...] = jax.lax.stop_gradient(new_stats.mean.reshape(stored_shape))
      self.var[...] = jax.lax.stop_gradient(new_stats.var.reshape(stored_shape))
      if self.count is not None:
        self.count[...] = new_stats.count
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Sets the mode for `nnx.view(model, use_running_average=...)` (`model.train()` / `model.eval()`).

    Args:
      use_running_average: if True, normalize with the running statistics; if False, with the batch's;
        None leaves the mode as it is.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
