"""Batch moments: masks, float32 accumulation, an exact variance, cross-device combination.

The variance is computed in two passes, `mean = sum(x) / n`, then `var = sum(|x - mean|^2) / n`,
which stays exact when the mean dwarfs the spread (x = 1e4 + N(0, 1) in float32), unlike the
one-pass `E[x^2] - E[x]^2` (Flax's `use_fast_variance=True`), which loses every significant bit
there. For complex x the mean is complex and the variance real, `E|x - mean|^2`.

Across devices (an `axis_name`), each device's `(n_d, mean_d, M2_d)` are combined exactly, with
Chan et al.'s pairwise rule in its all-reduce form:

  N = sum_d n_d,   mean = sum_d n_d mean_d / N,   M2 = sum_d [M2_d + n_d |mean_d - mean|^2],

so uneven masks across devices give the statistics of the concatenated, filtered batch.

Reference: Chan, Golub and LeVeque, "Algorithms for computing the sample variance" (1983).
"""

import math

import jax
import jax.numpy as jnp

from bnjax._src import checks
from bnjax._src import fusion
from bnjax._src import types


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 (complex64) for 32-bit and narrower inputs; the input's dtype for 64-bit ones."""
  return jnp.promote_types(dtype, jnp.float32)


def abs_sq(d):
  """`|d|^2`, real."""
  if jnp.iscomplexobj(d):
    return jnp.square(d.real) + jnp.square(d.imag)
  return d * d


def sync_sum(value, names: tuple[str, ...], groups=None):
  """`value` summed over the devices of `names` (identity when there are none)."""
  if not names:
    return value
  return jax.lax.psum(value, names, axis_index_groups=groups)


def local_moments(x, mask, spec: checks.Spec):
  """This device's `(n, mean, M2)` over `spec.reduced_axes` (keepdims), in the accumulation dtype."""
  acc = accumulation_dtype(x.dtype)
  red = spec.reduced_axes
  if mask is None:
    n = jnp.asarray(math.prod(x.shape[i] for i in red), jnp.finfo(acc).dtype)
    mean = jnp.sum(fusion.upcast(x, acc, 0), axis=red, keepdims=True) / n
    deviation = fusion.upcast(x, acc, 1) - fusion.fence(mean)
  else:
    n = jnp.sum(mask, axis=red, keepdims=True, dtype=jnp.finfo(acc).dtype)
    mean = jnp.sum(jnp.where(mask, fusion.upcast(x, acc, 0), 0), axis=red, keepdims=True) / jnp.maximum(n, 1)
    deviation = jnp.where(mask, fusion.upcast(x, acc, 1) - fusion.fence(mean), 0)
  return n, mean, jnp.sum(abs_sq(deviation), axis=red, keepdims=True)


def combine(n, mean, m2, spec: checks.Spec):
  """`(mean, var, count)` of the whole batch from each device's `(n, mean, M2)` (Chan et al.).

  Without masks every device has the same `n`, so the counts need no all-reduce.
  """
  names, groups = spec.axis_names, spec.axis_index_groups
  if not names:
    return mean, m2 / jnp.maximum(n, 1), n
  if not spec.masked:
    count = jnp.asarray(spec.count, n.dtype)
    total = sync_sum(n * mean, names, groups)
  else:
    n_b = jnp.broadcast_to(n, mean.shape)
    total, count = sync_sum((n_b * mean, n_b), names, groups)
  global_mean = total / jnp.maximum(count, 1)
  m2 = sync_sum(m2 + n * abs_sq(mean - global_mean), names, groups)
  return global_mean, m2 / jnp.maximum(count, 1), count


def batch_moments(x, mask, spec: checks.Spec):
  """`(mean, var, count)` per feature (x's rank, size 1 on reduced axes), synchronised per `spec`."""
  return combine(*local_moments(x, mask, spec), spec)


def moments(x, *, axis: types.Axis = -1, axis_name: types.AxisName = None, axis_index_groups=None, mask=None):
  """Batch mean and biased variance per feature, as batch norm's training mode uses them.

  `mean = sum(x) / m`, `var = sum(|x - mean|^2) / m` over every axis except `axis`, with `m` the
  number of values per feature (true values when masked), summed across the devices of `axis_name`.

  Args:
    x: floating or complex array, e.g. `(N, D)`, `(N, T, D)`, NHWC with `axis=-1`, NCHW with `axis=1`.
    axis: the feature axis or axes (kept).
    axis_name: a mapped axis name (or tuple of names) to reduce across devices.
    axis_index_groups: sync only within these groups of axis indices.
    mask: boolean; x's shape without the feature axes (whole rows), or any shape broadcastable to x
      (each feature counts its own true entries).

  Returns:
    `(mean, var)`, each of the feature shape, float32 (complex64 mean for complex inputs; 64-bit for
    64-bit inputs). A feature with no values has NaN statistics.
  """
  spec, mask = checks.spec(x, axis=axis, axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask)
  mean, var, count = batch_moments(x, mask, spec)
  empty = count == 0
  mean, var = jnp.where(empty, jnp.nan, mean), jnp.where(empty, jnp.nan, var)
  return mean.reshape(spec.feature_shape), var.reshape(spec.feature_shape)
