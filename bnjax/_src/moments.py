"""Batch moments: reduction axes, masks, float32 accumulation, a stable variance, cross-device sync.

The variance is computed in two passes, `mean = sum(x) / n`, then `var = sum((x - mean)^2) / n`,
which stays exact when the mean dwarfs the spread (x = 1e4 + N(0, 1) in float32), unlike the
one-pass `E[x^2] - E[x]^2` (Flax's `use_fast_variance=True`), which loses every significant bit
there. On XLA:CPU, whose reductions do not share a pass anyway, it reads x as often as the one-pass
form; it needs no element of x to be picked out as a shift, which sharding-in-types forbids.

Across devices (an `axis_name`), each device's `(n_d, mean_d, M2_d)` are combined exactly, with
Chan et al.'s pairwise rule in its all-reduce form:

  N = sum_d n_d,   mean = sum_d n_d mean_d / N,   M2 = sum_d [M2_d + n_d (mean_d - mean)^2],

so uneven masks across devices give the statistics of the concatenated, filtered batch.

Reference: Chan, Golub and LeVeque, "Algorithms for computing the sample variance" (1983).
"""
import math
from typing import Tuple

import jax
import jax.numpy as jnp

from bnjax._src import errors
from bnjax._src import types


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for float32 and narrower inputs; float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _behind_barriers(x, count: int):
  """x behind `count` nested optimization barriers: identical barriers would be merged by CSE, nested ones
  of different depths are not."""
  for _ in range(count):
    x = jax.lax.optimization_barrier(x)
  return x


def upcast(x, dtype, use: int):
  """`x.astype(dtype)` for the `use`-th place that reads x, kept apart from the other places.

  XLA:CPU writes one shared `convert(x)` that feeds several kernels out as a full-size temporary
  (for bfloat16 x: twice x's bytes, written then read back by each kernel). Each use converts on
  its own, behind `use` nested optimization barriers (identical barriers would be merged back into
  one by CSE), so the conversion fuses into each consumer. A no-op when x already has `dtype`.
  """
  if x.dtype == dtype:
    return x
  return _behind_barriers(x, use).astype(dtype)


def downcast_sum(terms, dtype, shape):
  """`sum(terms)` broadcast to `shape` in `dtype`; for a narrower dtype, each term cast on its own.

  The transpose of one shared cast is one shared conversion of the cotangent, which XLA:CPU writes
  out as a full-size float32 temporary read by every backward kernel. Casting each term apart
  (behind nested barriers, as in `upcast`) gives each backward kernel its own fused conversion.
  """
  terms = [t for t in terms if t is not None]
  if dtype == terms[0].dtype:
    total = terms[0]
    for t in terms[1:]:
      total = total + t
    return jnp.broadcast_to(total, shape)
  total = None
  for use, t in enumerate(terms):
    t = _behind_barriers(jnp.broadcast_to(t, shape).astype(dtype), use)
    total = t if total is None else total + t
  return total


def reduction_axes(ndim: int, kept_axes: Tuple[int, ...]) -> Tuple[int, ...]:
  return tuple(i for i in range(ndim) if i not in kept_axes)


def sync_sum(value, axis_name: types.AxisName, axis_index_groups=None):
  """`value` summed over the devices of `axis_name` (identity when it is None)."""
  if axis_name is None or axis_name == ():
    return value
  return jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups)


def raw_moments(x, kept_axes: Tuple[int, ...], *, mask=None, axis_name: types.AxisName = None,
                axis_index_groups=None):
  """Mean, biased variance and element count of `x` over every axis not in `kept_axes`.

  Args:
    x: any floating array; accumulated in `accumulation_dtype(x.dtype)`.
    kept_axes: canonical axes whose entries get their own statistics.
    mask: None, or a boolean array of x's rank with size 1 on `kept_axes` that are feature axes.
    axis_name, axis_index_groups: reduce across these mapped devices too.

  Returns:
    `(mean, var, count)`: mean and var with x's rank (size 1 on reduced axes), in the accumulation
    dtype; count, the number of elements (rows) that entered each statistic, globally, as an array
    broadcastable to mean.
  """
  acc = accumulation_dtype(x.dtype)
  red = reduction_axes(x.ndim, kept_axes)
  if mask is None:
    n_local = jnp.asarray(math.prod(x.shape[i] for i in red), acc)
    local_mean = jnp.sum(upcast(x, acc, 0), axis=red, keepdims=True) / n_local
    # The barrier keeps mean's arithmetic out of the fused reduction below, so XLA:CPU reads x once
    # for it instead of first writing a full-size (x - mean) temporary.
    deviation = upcast(x, acc, 1) - jax.lax.optimization_barrier(local_mean)
    local_m2 = jnp.sum(deviation * deviation, axis=red, keepdims=True)
  else:
    n_local = jnp.sum(mask, axis=red, keepdims=True, dtype=acc)
    safe_n = jnp.maximum(n_local, 1.0)
    local_mean = jnp.sum(jnp.where(mask, upcast(x, acc, 0), 0.0), axis=red, keepdims=True) / safe_n
    deviation = jnp.where(mask, upcast(x, acc, 1) - jax.lax.optimization_barrier(local_mean), 0.0)
    local_m2 = jnp.sum(deviation * deviation, axis=red, keepdims=True)

  return combine(n_local, local_mean, local_m2, axis_name, axis_index_groups,
                 same_count=mask is None)


def combine(n_local, local_mean, local_m2, axis_name: types.AxisName, axis_index_groups=None, *,
            same_count: bool):
  """`(mean, var, count)` of the whole batch from each device's `(n, mean, M2)` (Chan et al.).

  `same_count`: every device has `n_local` rows (no mask), so the counts need no all-reduce.
  Without an `axis_name` this is the local `(mean, M2 / n, n)`.
  """
  if axis_name is None or axis_name == ():
    count = n_local
    return local_mean, local_m2 / jnp.maximum(count, 1.0), count

  # Chan's combination: one all-reduce for (sum of x, count), one for M2.
  if same_count:
    count = n_local * errors.axis_size(axis_name, axis_index_groups)
    total = sync_sum(n_local * local_mean, axis_name, axis_index_groups)
  else:
    n_b = jnp.broadcast_to(n_local, local_mean.shape)
    total, count = sync_sum((n_b * local_mean, n_b), axis_name, axis_index_groups)
  mean = total / jnp.maximum(count, 1.0)
  m2 = sync_sum(local_m2 + n_local * jnp.square(local_mean - mean), axis_name, axis_index_groups)
  return mean, m2 / jnp.maximum(count, 1.0), count


def moments(x, *, axis: types.Axis = -1, axis_name: types.AxisName = None,
            axis_index_groups=None, mask=None) -> Tuple[jax.Array, jax.Array]:
  """Batch mean and biased variance per feature, as batch norm's training mode uses them.

  `mean = sum(x) / m`, `var = sum((x - mean)^2) / m` over every axis except `axis`, with `m` the
  number of rows (true rows when masked), summed across the devices of `axis_name`.

  Args:
    x: floating array, e.g. `(N, D)`, `(N, T, D)`, NHWC with `axis=-1`, NCHW with `axis=1`.
    axis: the feature axis or axes (kept).
    axis_name: a mapped axis name (or tuple of names) to reduce across devices.
    axis_index_groups: sync only within these groups of axis indices.
    mask: boolean, x's shape without the feature axes; only true rows count.

  Returns:
    `(mean, var)`, each of the feature shape, float32 (float64 for float64 inputs).
  """
  errors.check_floating(x)
  axes = errors.feature_axes(axis, x.ndim)
  if mask is not None:
    mask = errors.mask_to_input_rank(mask, x.shape, axes)
  errors.axis_size(axis_name, axis_index_groups)
  mean, var, _ = raw_moments(x, axes, mask=mask, axis_name=axis_name,
                             axis_index_groups=axis_index_groups)
  feature_shape = tuple(x.shape[a] for a in axes)
  return mean.reshape(feature_shape), var.reshape(feature_shape)
