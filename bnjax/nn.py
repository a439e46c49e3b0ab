"""A flax.linen `BatchNorm` on the bnjax core, a drop-in for `flax.linen.BatchNorm`.

`BatchNorm` owns the variables and the arguments of `flax.linen.BatchNorm` (same names, shapes, dtypes and
defaults), and hands the statistics and the normalization to `bnjax.batch_norm`, so swapping

    from flax.linen import BatchNorm      ->      from bnjax.nn import BatchNorm

changes nothing else in a model: checkpoints load both ways.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from flax.linen import dtypes as linen_dtypes
from flax.linen import initializers

import bnjax
from bnjax._src import errors as _errors

__all__ = ["BatchNorm"]

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


# ------------------------------------------------------------------------------------------------------
# Argument checks and conversions shared with bnjax.nnx.
# ------------------------------------------------------------------------------------------------------


def _check_axis_spec(axis: Any, arg: str = "axis") -> None:
  """Checks that `axis` is an int or a non-empty sequence of distinct ints (ranks are checked at call)."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
  if isinstance(axis, bool) or not isinstance(axes, Sequence) or not axes:
    raise TypeError(f"{arg} must be an int or a non-empty sequence of ints, got {axis!r}")
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
      raise TypeError(f"{arg} must be an int or a non-empty sequence of ints, got {axis!r}")
  if len(set(int(a) for a in axes)) != len(axes):
    raise ValueError(f"{arg} must not repeat an axis, got {axis!r}")


def _feature_axes(ndim: int, axis: Any, arg: str = "axis") -> tuple[int, ...]:
  """The feature axes of a rank-`ndim` input as sorted non-negative ints (the order flax uses)."""
  return _errors.feature_axes(axis, ndim, arg=arg)


def _check_momentum(momentum: Any) -> None:
  if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
    raise TypeError(f"momentum must be a float in [0, 1], got {momentum!r}")
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1] (the weight of the old running value), got {momentum!r}")


def _check_epsilon(epsilon: Any) -> None:
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating, np.integer)):
    raise TypeError(f"epsilon must be a positive float, got {epsilon!r}")
  if not epsilon > 0.0:
    raise ValueError(f"epsilon must be > 0 (it keeps 1 / sqrt(var + epsilon) finite), got {epsilon!r}")


def _check_optional_bool(value: Any, arg: str) -> None:
  if value is not None and not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{arg} must be True, False or None, got {value!r}")


def _check_bool(value: Any, arg: str) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{arg} must be True or False, got {value!r}")


def _check_virtual_batch_size(virtual_batch_size: Any) -> None:
  if virtual_batch_size is None:
    return
  if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, (int, np.integer)):
    raise TypeError(f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}")
  if virtual_batch_size < 1:
    raise ValueError(f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}")


def _check_running(running: Any) -> None:
  if running not in bnjax.RUNNING_RULES:
    raise ValueError(f"running must be one of {bnjax.RUNNING_RULES}, got {running!r}")


def _check_axis_name(axis_name: Any, axis_index_groups: Any) -> None:
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"axis_name must be a str (or a tuple of str) or None, got {axis_name!r}")
  if axis_index_groups is not None and axis_name is None:
    raise ValueError(
      f"axis_index_groups={axis_index_groups!r} needs an axis_name: groups are subsets of the devices of a "
      "named mapped axis"
    )


def _check_common(
  *,
  axis: Any,
  momentum: Any,
  epsilon: Any,
  use_bias: Any,
  use_scale: Any,
  axis_name: Any,
  axis_index_groups: Any,
  use_fast_variance: Any,
  virtual_batch_size: Any,
  unbiased_running_var: Any,
  running: Any,
  implementation: Any,
) -> None:
  """The constructor checks common to the linen and nnx layers."""
  _check_axis_spec(axis)
  _check_momentum(momentum)
  _check_epsilon(epsilon)
  _check_bool(use_bias, "use_bias")
  _check_bool(use_scale, "use_scale")
  _check_axis_name(axis_name, axis_index_groups)
  _check_bool(use_fast_variance, "use_fast_variance")
  _check_virtual_batch_size(virtual_batch_size)
  _check_bool(unbiased_running_var, "unbiased_running_var")
  _check_running(running)
  _errors.check_implementation(implementation)


def _core_mask(mask: Any, x_shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> Array | None:
  """Converts a flax-style mask into the core's form: x's rank with size-1 feature axes.

  Accepted masks:
    * the core's form, x's shape without the feature axes (rank `x.ndim - len(feature_axes)`);
    * flax's form, any boolean array broadcastable to x's shape (rank at most `x.ndim`). bnjax selects
      whole rows of the batch, so a mask that spans the feature axes must be the same for every feature.
      That is checked on a concrete mask; a traced one (under `jit`) that spans the feature axes cannot be
      checked and is refused rather than silently reduced: pass the row mask instead.
  """
  if mask is None:
    return None
  # A concrete mask is checked and reshaped in numpy, so that the check also runs while tracing a jit.
  mask = mask if isinstance(mask, jax.core.Tracer) else np.asarray(mask)
  if mask.dtype != np.bool_:
    raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
  ndim = len(x_shape)
  batch_only = tuple(d for i, d in enumerate(x_shape) if i not in feature_axes)
  kept_shape = tuple(1 if i in feature_axes else d for i, d in enumerate(x_shape))
  if mask.ndim == len(batch_only) and mask.ndim < ndim:
    if mask.shape != batch_only:
      raise ValueError(
        f"mask has shape {mask.shape}; expected the input's shape without its feature axes {batch_only}, "
        f"or a shape broadcastable to the input's shape {x_shape}"
      )
    return jnp.asarray(mask).reshape(kept_shape)
  if mask.ndim > ndim or any(m not in (1, d) for m, d in zip(mask.shape[::-1], x_shape[::-1])):
    raise ValueError(
      f"mask has shape {mask.shape}; expected a shape broadcastable to the input's shape {x_shape}, or the "
      f"input's shape without its feature axes {batch_only}"
    )
  mask = mask.reshape((1,) * (ndim - mask.ndim) + mask.shape)
  spans_features = tuple(a for a in feature_axes if mask.shape[a] != 1)
  if spans_features:
    first_feature = tuple(slice(0, 1) if a in spans_features else slice(None) for a in range(ndim))
    if isinstance(mask, jax.core.Tracer):
      raise ValueError(
        f"`mask` of shape {mask.shape} spans the feature axes {feature_axes} and is traced (under jit), so "
        "bnjax cannot check that it is the same for every feature (bnjax masks whole rows). Pass the row "
        f"mask, of the input's shape without its feature axes {batch_only}, e.g. "
        f"`mask.all(axis={spans_features})`."
      )
    if not np.array_equal(np.broadcast_to(mask[first_feature], mask.shape), mask):
      raise ValueError(
        "`mask` differs between features; bnjax masks whole rows of the batch, so a mask spanning the "
        f"feature axes {feature_axes} must be constant along them (got shape {mask.shape})"
      )
    mask = mask[first_feature]
  return jnp.broadcast_to(mask, kept_shape)


# ------------------------------------------------------------------------------------------------------
# BatchNorm
# ------------------------------------------------------------------------------------------------------


class BatchNorm(linen.Module):
  r"""Batch normalization (Ioffe & Szegedy, 2015), a drop-in for `flax.linen.BatchNorm`.

  For an input `x` with feature axes `axis` (every other axis is a batch axis that is reduced), training
  mode computes per feature

      mu = mean_B(x),   sigma^2 = mean_B((x - mu)^2),   y = scale * (x - mu) / sqrt(sigma^2 + epsilon) + bias

  and moves the running statistics as `running = momentum * running + (1 - momentum) * batch`. Evaluation
  mode (`use_running_average=True`) normalizes with the running `mean` and `var` instead. The statistics
  and the normalization are `bnjax.batch_norm`'s (float32 moments whatever the input dtype, the closed-form
  backward pass); this module only owns the variables:

    * `params/scale`, `params/bias`: `param_dtype`, shape `feature_shape = [x.shape[a] for a in
      sorted(axis)]` (absent when `use_scale` / `use_bias` is False);
    * `batch_stats/mean` (zeros), `batch_stats/var` (ones): float32 (`param_dtype` when
      `force_float32_reductions=False`), shape `feature_shape`;

  exactly flax's names, shapes and dtypes, so variables trained with either class apply in the other.
  Like flax, the running statistics are not updated while `init` runs (`self.is_initializing()`), and the
  batch statistics are not synchronised across `axis_name` then, so `init` works outside the mapped axis.

  Differences from flax, all on purpose:
    * the variance is always the stable two-pass variance `mean((x - mu)^2)`; `use_fast_variance` is
      accepted for compatibility and ignored (flax's default `E[x^2] - E[x]^2` loses precision when the
      mean is large against the spread). Outputs match `flax.linen.BatchNorm(use_fast_variance=False)`.
    * moments are always accumulated in float32; `force_float32_reductions=False` only keeps flax's
      storage dtype (`param_dtype`) for the running statistics.
    * a `mask` selects whole rows of the batch: it has x's shape without the feature axes (bnjax's form),
      or, as in flax, a shape broadcastable to x's shape that is constant along the feature axes.
    * keyword-only extras (their defaults keep flax's behaviour): `virtual_batch_size` (ghost batch norm:
      the batch axis is split into groups of that size, each normalized with its own statistics),
      `unbiased_running_var` (store `m / (m - 1) * var` in the running variance, as the paper's
      Algorithm 2 and PyTorch do) and `running` (`"ema"`; `"ema_debiased"` or `"cumulative"` add an
      int32 `batch_stats/count` variable, see `bnjax.batch_norm`).
    * `epsilon` must be > 0.

  Attributes:
    use_running_average: if True, normalize with the stored running statistics instead of the batch's;
      given here or at call (exactly one of the two, as `flax.linen.merge_param` requires).
    axis: the feature axis or axes (int or sequence of ints, negative allowed), e.g. -1 for NHWC, 1 for
      NCHW.
    momentum: decay of the exponential moving average of the batch statistics (bnjax's `decay`).
    epsilon: added to the variance inside the square root.
    dtype: the output dtype; default: promoted from the input and the parameters (flax's rule).
    param_dtype: the dtype of `scale` and `bias`.
    use_bias: add the learned `bias` (beta).
    use_scale: multiply by the learned `scale` (gamma).
    bias_init: initializer of `bias` (zeros).
    scale_init: initializer of `scale` (ones).
    axis_name: the mapped axis (pmap, shard_map, vmap) over which the batch statistics are synchronised;
      not needed under a sharded `jit`, where the batch is already global.
    axis_index_groups: subsets of the devices of `axis_name` that are synchronised separately.
    use_fast_variance: accepted for compatibility with flax; bnjax always uses the stable variance.
    force_float32_reductions: accepted for compatibility with flax; bnjax always reduces in float32, and
      False stores the running statistics in `param_dtype` as flax does.
    virtual_batch_size: keyword-only; ghost batch size, or None for the whole batch.
    unbiased_running_var: keyword-only; store the unbiased batch variance in the running variance.
    running: keyword-only; the running-statistics rule, one of `bnjax.RUNNING_RULES`.
    implementation: keyword-only; None / "xla" (pure JAX) or "cpu_kernel" (bnjax's CPU kernels for the
      training-mode reductions; see `bnjax.batch_norm`).

  Reference: S. Ioffe, C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift", ICML 2015, Algorithms 1 and 2.
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  _: dataclasses.KW_ONLY
  virtual_batch_size: int | None = None
  unbiased_running_var: bool = False
  running: str = "ema"
  implementation: str | None = None

  def __post_init__(self):
    _check_optional_bool(self.use_running_average, "use_running_average")
    _check_common(
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      use_bias=self.use_bias,
      use_scale=self.use_scale,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      use_fast_variance=self.use_fast_variance,
      virtual_batch_size=self.virtual_batch_size,
      unbiased_running_var=self.unbiased_running_var,
      running=self.running,
      implementation=self.implementation,
    )
    _check_bool(self.force_float32_reductions, "force_float32_reductions")
    super().__post_init__()

  @linen.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask: Array | None = None):
    """Normalizes `x` with the batch's statistics (training) or the running ones (evaluation).

    Args:
      x: the input, any rank above the number of feature axes; a floating dtype.
      use_running_average: if True, use the running statistics; exactly one of this and the attribute of
        the same name must be given.
      mask: boolean, True for the rows that count in the statistics (see the class docstring for shapes);
        only used in training mode.

    Returns:
      The normalized input, x's shape, dtype `self.dtype` or promoted from x and the parameters.
    """
    use_running_average = linen.module.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    _check_optional_bool(use_running_average, "use_running_average")
    x = jnp.asarray(x)
    feature_axes = _feature_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)

    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape)
    # Only the non-default running rules need a batch counter: the default layout stays flax's.
    ra_count = (
      self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32)) if self.running != "ema" else None
    )
    scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
    bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None

    # Flax's output dtype; computing in the wider of it and x's dtype keeps bfloat16 inputs with float32
    # parameters as exact as flax, which normalizes in float32 before the final cast.
    out_dtype = linen_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    compute_dtype = jnp.promote_types(x.dtype, out_dtype)
    stats = bnjax.BatchStats(
      mean=jnp.asarray(ra_mean.value, jnp.float32),
      var=jnp.asarray(ra_var.value, jnp.float32),
      count=None if ra_count is None else ra_count.value,
    )
    train = not use_running_average
    initializing = self.is_initializing()
    if not train:
      axis_name = None
    elif initializing:
      # Flax does not synchronise during init, so `init` may run outside the mapped axis; `()` tells the
      # core that per-device statistics are intended, also inside a shard_map.
      axis_name = ()
    else:
      axis_name = self.axis_name
    y, new_stats = bnjax.batch_norm(
      x.astype(compute_dtype),
      bnjax.BatchNormParams(scale=scale, bias=bias),
      stats,
      train=train,
      axis=feature_axes,
      decay=self.momentum,
      epsilon=self.epsilon,
      axis_name=axis_name,
      axis_index_groups=self.axis_index_groups if axis_name else None,
      mask=_core_mask(mask, x.shape, feature_axes) if train else None,
      virtual_batch_size=self.virtual_batch_size if train else None,
      unbiased_running_var=self.unbiased_running_var,
      running=self.running,
      implementation=self.implementation,
    )
    if train and not initializing:
      ra_mean.value = new_stats.mean.astype(stats_dtype)
      ra_var.value = new_stats.var.astype(stats_dtype)
      if ra_count is not None:
        ra_count.value = new_stats.count
    return y.astype(out_dtype)
