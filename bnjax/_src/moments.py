"""Batch moments: masks, float32 accumulation, an exact variance, cross-device combination.

Flax's one-pass `E[x^2] - E[x]^2` (`use_fast_variance=True`) loses every significant bit of the
variance when the mean dwarfs the spread (x = 1e4 + N(0, 1) in float32). bnjax has two exact forms,
chosen when the program is traced, by JAX's default backend (no runtime branch; a program lowered for
another platform runs the other form, as exact and only slower there):

- **two passes** (one XLA:CPU device, and every masked input): `mean = sum(x) / n`, then
  `M2 = sum(|x - mean|^2)`. XLA:CPU reduces one array at a time, so a second read costs no more
  than a second sum in the same read.
- **one pass around a shift drawn from the batch** (GPU, TPU; across devices on any backend): with
  `K` the first value of each feature (per device, per ghost batch), `S1 = sum(x - K)` and
  `S2 = sum(|x - K|^2)` are sibling reductions that XLA fuses into one read of x, and

    mean = K + S1 / n,   M2 = S2 - |S1|^2 / n.

  The cancellation in `M2` now depends on `z = (K - mean) / std`, not on the mean's size: the
  relative error of the variance is about `(1 + z^2)` float32 roundings, and `K` is a value of the
  batch, so `|z|` is a few units at most for any sensible data. No guard and no branch.

For complex x the mean is complex and the variance real, `E|x - mean|^2`.

Across devices (an `axis_name`), each device's `(n_d, mean_d, M2_d)` are combined exactly, with
Chan et al.'s pairwise rule in its all-reduce form:

  N = sum_d n_d,   mean = sum_d n_d mean_d / N,   M2 = sum_d [M2_d + n_d |mean_d - mean|^2],

where `mean_d - mean` is taken as `(K_d - mean) + S1_d / n_d` (or from the two-pass mean and its
residual `sum(x - mean_d) / n_d`): rounding `mean_d` to float32 would otherwise cost the combined
variance about `sqrt(n_d)` roundings of the mean (2e-5 of it at x = 1e4 + N(0, 1), 256 rows per
device). Uneven masks across devices give the statistics of the concatenated, filtered batch.

Reference: Chan, Golub and LeVeque, "Algorithms for computing the sample variance" (1983).
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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


def two_pass_moments(x, mask, spec: checks.Spec):
  """This device's `(n, mean, residual, M2)`: the mean, then the deviations from it (two reads of x).

  The residual `sum(x - mean) / n` corrects the mean's own rounding; it is needed (and taken) only across
  devices, where that rounding would enter the combined variance at first order.
  """
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
  m2 = jnp.sum(abs_sq(deviation), axis=red, keepdims=True)
  if not spec.axis_names:
    return n, mean, jnp.zeros_like(mean), m2
  return n, mean, jnp.sum(deviation, axis=red, keepdims=True) / jnp.maximum(n, 1), m2


def batch_shift(x, axes: tuple[int, ...]):
  """x's first value along each of `axes` (keepdims), without gradient: a shift drawn from the batch."""
  for axis in axes:
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    if axis < len(spec) and spec[axis] is not None:
      # An explicitly sharded axis is sliced by a gather told to replicate the row it takes.
      out = jax.typeof(x).sharding.update(spec=P(*(None if a == axis else p for a, p in enumerate(spec))))
      x = x.at[(slice(None),) * axis + (jnp.zeros((1,), jnp.int32),)].get(out_sharding=out)
    else:
      x = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  return jax.lax.stop_gradient(x)


def shifted_moments(x, spec: checks.Spec, *, separate_uses: bool = False):
  """This device's `(n, K, S1 / n, M2)` from `S1 = sum(x - K)`, `S2 = sum(|x - K|^2)` (one read of x, unmasked).

  `separate_uses` spells `x - K` apart for each sum, for XLA:CPU, which would otherwise write it out once
  (elsewhere the shared spelling is what lets XLA fuse the two sums into one read).
  """
  acc = accumulation_dtype(x.dtype)
  red = spec.reduced_axes
  n = jnp.asarray(math.prod(x.shape[i] for i in red), jnp.finfo(acc).dtype)
  shift = batch_shift(x, red)
  if separate_uses:  # the fenced row also keeps XLA from slicing a shared, written-out convert(x)
    shift = fusion.fence(shift).astype(acc)
    deviation, deviation_2 = fusion.upcast(x, acc, 0) - shift, fusion.upcast(x, acc, 1) - fusion.fence(shift)
  else:
    shift = shift.astype(acc)
    deviation = deviation_2 = x.astype(acc) - shift
  s1 = jnp.sum(deviation, axis=red, keepdims=True)
  s2 = jnp.sum(abs_sq(deviation_2), axis=red, keepdims=True)
  m2 = jnp.maximum(s2 - abs_sq(s1) / n, 0.0)  # rounding can take a near-constant feature below 0
  return n, shift, s1 / n, m2


def local_moments(x, mask, spec: checks.Spec):
  """This device's `(n, shift, offset, M2)` over `spec.reduced_axes` (keepdims, accumulation dtype);
  its mean is `shift + offset`.

  One pass around a shift from the batch where XLA fuses sibling reductions (GPU, TPU) and on every
  backend across devices; two passes on a single CPU device and under a mask (see the module docstring).
  """
  if mask is not None:
    return two_pass_moments(x, mask, spec)
  if jax.default_backend() != "cpu":
    return shifted_moments(x, spec)
  if spec.axis_names:
    return shifted_moments(x, spec, separate_uses=True)
  return two_pass_moments(x, None, spec)


def combine(n, shift, offset, m2, spec: checks.Spec):
  """`(mean, var, count)` of the whole batch from each device's `(n, shift, offset, M2)` (Chan et al.).

  A device's deviation from the global mean is taken as `(shift - mean) + offset`, so the rounding of
  its own mean never enters. Without masks every device has the same `n`: the counts need no all-reduce.
  """
  names, groups = spec.axis_names, spec.axis_index_groups
  if not names:
    return shift + offset, m2 / jnp.maximum(n, 1), n
  local_mean = shift + offset
  if not spec.masked:
    count = jnp.asarray(spec.count, n.dtype)
    total = sync_sum(n * local_mean, names, groups)
  else:
    n_b = jnp.broadcast_to(n, local_mean.shape)
    total, count = sync_sum((n_b * local_mean, n_b), names, groups)
  global_mean = total / jnp.maximum(count, 1)
  m2 = sync_sum(m2 + n * abs_sq((shift - global_mean) + offset), names, groups)
  return global_mean, m2 / jnp.maximum(count, 1), count


def batch_moments(x, mask, spec: checks.Spec):
  """`(mean, var, count)` per feature (x's rank, size 1 on reduced axes), synchronised per `spec`."""
  n, shift, offset, m2 = local_moments(x, mask, spec)
  return combine(n, shift, offset, m2, spec)


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
