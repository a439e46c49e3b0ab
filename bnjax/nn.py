"""A flax.linen `BatchNorm` on the bnjax core, a drop-in for `flax.linen.BatchNorm`.

`BatchNorm` owns the variables and the arguments of `flax.linen.BatchNorm` (same names, shapes, dtypes and
defaults), and hands the statistics and the normalization to `bnjax.batch_norm`, so swapping

    from flax.linen import BatchNorm      ->      from bnjax.nn import BatchNorm

changes nothing else in a model: checkpoints load both ways.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen
from flax.linen import dtypes as linen_dtypes
from flax.linen import initializers

import bnjax
from bnjax._src import checks

__all__ = ["BatchNorm"]

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


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

  Differences from flax, all on purpose (the full list is in the docs' layers guide):
    * the variance is always the exact `mean(|x - mu|^2)`; `use_fast_variance` is accepted and
      ignored (flax's default `E[x^2] - E[x]^2` loses precision when the mean is large against the
      spread). Outputs match `flax.linen.BatchNorm(use_fast_variance=False)`.
    * moments are always accumulated in float32; `force_float32_reductions=False` only keeps flax's
      storage dtype (`param_dtype`) for the running statistics.
    * a `mask` may also have x's shape without the feature axes (whole rows), besides flax's form (any
      shape broadcastable to x, each feature over its own true entries).
    * keyword-only extras (their defaults keep flax's behaviour): `virtual_batch_size` (ghost batch norm:
      the batch axis is split into groups of that size, each normalized with its own statistics),
      `unbiased_running_var` (store `m / (m - 1) * var` in the running variance, as the paper's
      Algorithm 2 and PyTorch do) and `running` (`"ema"`; `"ema_debiased"` or `"cumulative"` add an
      int32 `batch_stats/count` variable, see `bnjax.batch_norm`).
    * `epsilon` must be > 0.

  As in flax, a training call with one value per feature (a dummy batch of one in `init`, `tabulate`
  or `eval_shape`) is accepted: its output is `bias`.

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

  def __post_init__(self):
    checks.layer_options(
      use_running_average=self.use_running_average,
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
    )
    checks.check_bool(self.force_float32_reductions, "force_float32_reductions")
    super().__post_init__()

  @linen.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask: Array | None = None):
    """Normalizes `x` with the batch's statistics (training) or the running ones (evaluation).

    Args:
      x: the input, any rank above the number of feature axes; a floating dtype.
      use_running_average: if True, use the running statistics; exactly one of this and the attribute of
        the same name must be given.
      mask: boolean, True for the values that count in the statistics: x's shape without the feature
        axes, or any shape broadcastable to x; only used in training mode.

    Returns:
      The normalized input, x's shape, dtype `self.dtype` or promoted from x and the parameters.
    """
    use_running_average = linen.module.merge_param("use_running_average", self.use_running_average, use_running_average)
    checks.check_bool(use_running_average, "use_running_average")
    x = jnp.asarray(x)
    feature_axes = checks.feature_axes(self.axis, x.ndim)
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
      mean=_float32_reductions(ra_mean.value),
      var=_float32_reductions(ra_var.value),
      count=None if ra_count is None else ra_count.value,
    )
    train = not use_running_average
    initializing = self.is_initializing()
    y, new_stats = bnjax.batch_norm(
      x.astype(compute_dtype),
      bnjax.BatchNormParams(scale=scale, bias=bias),
      stats,
      train=train,
      axis=feature_axes,
      decay=self.momentum,
      epsilon=self.epsilon,
      # Flax does not synchronise during init, so `init` may run outside the mapped axis; `()` tells the
      # core that per-device statistics are intended, also inside a shard_map.
      axis_name=() if initializing else self.axis_name,
      axis_index_groups=None if initializing else self.axis_index_groups,
      mask=mask,
      virtual_batch_size=self.virtual_batch_size,
      unbiased_running_var=self.unbiased_running_var,
      running=self.running,
      allow_batch_of_one=True,
    )
    if train and not initializing:
      ra_mean.value = new_stats.mean.astype(_stored_dtype(stats_dtype, new_stats.mean))
      ra_var.value = new_stats.var.astype(stats_dtype)
      if ra_count is not None and new_stats.count is not None:
        ra_count.value = new_stats.count
    return y.astype(out_dtype)


def _float32_reductions(value):
  """A running statistic in the core's float32 (a complex one in complex64)."""
  return jnp.asarray(value, jnp.complex64 if jnp.iscomplexobj(value) else jnp.float32)


def _stored_dtype(stats_dtype, mean):
  """The storage dtype; a complex mean (complex inputs, as in flax) stays complex."""
  return jnp.result_type(stats_dtype, mean) if jnp.iscomplexobj(mean) else stats_dtype
