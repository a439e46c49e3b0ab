"""Batch normalization: `init`, `normalize` and `batch_norm` (training and inference modes).

Training mode (Ioffe & Szegedy 2015, Algorithm 1), per feature over the `m` rows of the batch:

  mu = (1/m) sum_i x_i,   sigma^2 = (1/m) sum_i (x_i - mu)^2,
  x_hat_i = (x_i - mu) / sqrt(sigma^2 + epsilon),   y_i = scale * x_hat_i + bias.

Its derivative is given in closed form, as the paper's backward formulas, through a `custom_jvp`
whose tangent map is linear, so forward mode (`jvp`, `jacfwd`, `hessian`) and reverse mode (JAX
transposes the linear map) both work, to any order:

  dy = scale * inv_std * (dx - mean(dx) - x_hat * mean(dx * x_hat)) + dscale * x_hat + dbias,

whose transpose is the paper's `dx = scale * inv_std / m * (m dy - sum(dy) - x_hat sum(dy x_hat))`,
`dscale = sum(dy x_hat)`, `dbias = sum(dy)`. The tangent map is rematerialised, so the backward pass
keeps only `x` (alive anyway) and per-feature vectors, never a copy of `x_hat`. Its two reductions
are summed across devices under `axis_name`, and respect `mask`.

Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015, arXiv:1502.03167.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from bnjax._src import checks
from bnjax._src import fusion
from bnjax._src import moments as moments_lib
from bnjax._src import running as running_lib
from bnjax._src import types


def init(
  feature_shape: int | Sequence[int], *, dtype=jnp.float32, use_scale: bool = True, use_bias: bool = True
) -> tuple[types.BatchNormParams, types.BatchStats]:
  """Fresh parameters (scale 1, bias 0) and running statistics (mean 0, var 1, count 0).

  Args:
    feature_shape: the sizes of x's feature axes, e.g. `D` for `(N, D)`, `C` for NHWC or NCHW.
    dtype: the parameters' dtype. Running statistics are float32 (float64 for float64 params).
    use_scale: False gives None in `scale` (scale 1, nothing learned).
    use_bias: False gives None in `bias` (bias 0, nothing learned).

  Returns:
    `(BatchNormParams(scale, bias), BatchStats(mean, var, count))`.
  """
  sizes = [feature_shape] if isinstance(feature_shape, (int, np.integer)) else feature_shape
  if (
    not isinstance(sizes, (list, tuple))
    or not sizes
    or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in sizes)
  ):
    raise ValueError(f"`feature_shape` must be a positive int or a tuple of them, got {feature_shape!r}.")
  shape = tuple(int(d) for d in sizes)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
  checks.check_bool(use_scale, "use_scale")
  checks.check_bool(use_bias, "use_bias")
  stats_dtype = jnp.promote_types(dtype, jnp.float32)
  params = types.BatchNormParams(
    scale=jnp.ones(shape, dtype) if use_scale else None, bias=jnp.zeros(shape, dtype) if use_bias else None
  )
  stats = types.BatchStats(
    mean=jnp.zeros(shape, stats_dtype), var=jnp.ones(shape, stats_dtype), count=jnp.zeros((), jnp.int32)
  )
  return params, stats


def _at_features(value, axes: tuple[int, ...], shape, dtype) -> jax.Array:
  """A feature-shaped array laid out to broadcast against an array of `shape`."""
  return jnp.asarray(value, dtype).reshape(tuple(shape[i] if i in axes else 1 for i in range(len(shape))))


def _maybe(fn, value, default=None, **kwargs):
  """`fn(value)` for an optional value (a missing scale or bias)."""
  return default if value is None else fn(value, **kwargs)


def _normalize_with(x, mean, inv_std, scale, bias):
  """`(x - mean) * (scale * inv_std) + bias` in the accumulation dtype, cast back to x's dtype."""
  multiplier = inv_std if scale is None else scale * inv_std
  y = (fusion.upcast(x, mean.dtype, 2) - mean) * multiplier
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


def _train_forward(x, scale, bias, mask, spec, epsilon):
  mean, var, count = moments_lib.batch_moments(x, mask, spec)
  inv_std = jax.lax.rsqrt(var + epsilon)
  if mask is not None:  # a feature without values normalizes to x_hat = 0: y = bias, finite gradients
    inv_std = jnp.where(count > 0, inv_std, 0.0)
  at = functools.partial(_at_features, axes=spec.feature_axes, shape=x.shape, dtype=mean.dtype)
  y = _normalize_with(x, mean, inv_std, _maybe(at, scale), _maybe(at, bias))
  return y, mean, var, count, inv_std


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _train_normalize(x, scale, bias, mask, spec, epsilon):
  return _train_forward(x, scale, bias, mask, spec, epsilon)[:4]


def _train_tangents(x, mean, inv_std, count, scale, mask, tx, tscale, tbias, *, spec):
  """The linear tangent map of training-mode batch norm (see the module docstring)."""
  red = spec.reduced_axes
  at = functools.partial(_at_features, axes=spec.feature_axes, shape=x.shape, dtype=mean.dtype)
  x_hat = (fusion.upcast(x, mean.dtype, 3) - mean) * inv_std
  # y's tangent is  gain * tx + offset + slope * x_hat,  with per-feature `offset` and `slope`, so
  # that its transpose (reverse mode) needs two full-size reductions and one elementwise pass.
  offset = jnp.zeros_like(mean)
  slope = jnp.zeros_like(mean)
  ty, t_mean, t_var = None, jnp.zeros_like(mean), jnp.zeros_like(inv_std)
  if tx is not None:
    tx = tx.astype(mean.dtype)
    counted = tx if mask is None else jnp.where(mask, tx, 0)  # masked values move y, not the statistics
    total = jnp.sum(counted, axis=red, keepdims=True)
    # Built after the first sum: the order in which the transpose adds dx's terms sets dx's rounding.
    proj = counted * x_hat if not jnp.iscomplexobj(x_hat) else (jnp.conj(x_hat) * counted).real
    sum_t, sum_proj = moments_lib.sync_sum(
      (total, jnp.sum(proj, axis=red, keepdims=True)), spec.axis_names, spec.axis_index_groups
    )
    safe_count = jnp.maximum(count, 1.0)
    t_mean, t_proj = sum_t / safe_count, sum_proj / safe_count
    gain = inv_std if scale is None else at(scale) * inv_std
    ty = gain * tx
    offset = offset - gain * t_mean
    slope = slope - gain * t_proj
    t_var = 2.0 * t_proj / jnp.maximum(inv_std, jnp.finfo(inv_std.dtype).tiny)  # t_proj = 0 where inv_std = 0
  if tscale is not None:
    slope = slope + at(tscale)
  if tbias is not None:
    offset = offset + at(tbias)
  # (x - mean) rather than x_hat: inv_std folds into the per-feature slope, so the reduction
  # sum(dy * (x - mean)) fuses with its operands.
  centered = fusion.upcast(x, mean.dtype, 4) - fusion.fence(mean)
  ty = fusion.downcast_sum((ty, offset, (slope * inv_std) * centered), x.dtype, x.shape)
  return ty, t_mean, t_var


def _is_zero(t) -> bool:
  return t is None or isinstance(t, SymbolicZero)


def _train_normalize_jvp(spec, epsilon, primals, tangents):
  x, scale, bias, mask = primals
  tx, tscale, tbias = (None if _is_zero(t) else t for t in tangents[:3])
  y, mean, var, count, inv_std = _train_forward(x, scale, bias, mask, spec, epsilon)
  if tx is None and tscale is None and tbias is None:
    zeros = (jnp.zeros_like(y), jnp.zeros_like(mean), jnp.zeros_like(var), jnp.zeros_like(count))
    return (y, mean, var, count), zeros
  # Rematerialised so that reverse mode recomputes x_hat from x instead of storing it.
  tangent_map = jax.checkpoint(functools.partial(_train_tangents, spec=spec))
  ty, t_mean, t_var = tangent_map(x, mean, inv_std, count, scale, mask, tx, tscale, tbias)
  return (y, mean, var, count), (ty, t_mean, t_var, jnp.zeros_like(count))


_train_normalize.defjvp(_train_normalize_jvp, symbolic_zeros=True)


def _ghost_spec(spec: checks.Spec, x_shape, virtual_batch_size: int) -> checks.Spec:
  """The spec of x split into `(groups, virtual_batch_size, ...)`.

  The group axis 0 is neither a feature axis (the parameters broadcast over it) nor reduced (each
  group has its own statistics). Ghost batches are local to each device.
  """
  count = math.prod(x_shape[i] for i in spec.reduced_axes) // x_shape[0] * virtual_batch_size
  return spec._replace(
    feature_axes=tuple(a + 1 for a in spec.feature_axes),
    reduced_axes=tuple(a + 1 for a in spec.reduced_axes),
    axis_names=(),
    axis_index_groups=None,
    count=count,
  )


def _ghost_normalize(x, scale, bias, mask, spec, epsilon, virtual_batch_size):
  """Ghost batch norm: `(y, mean, var, count)`, the statistics the count-weighted mean of the groups'."""
  groups = (x.shape[0] // virtual_batch_size, virtual_batch_size)
  grouped_mask = None if mask is None else mask.reshape(groups + mask.shape[1:])
  y, mean, var, count = _train_normalize(
    x.reshape(groups + x.shape[1:]), scale, bias, grouped_mask, _ghost_spec(spec, x.shape, virtual_batch_size), epsilon
  )
  weights = jnp.broadcast_to(count, var.shape)
  total = jnp.sum(weights, axis=0)
  mean = jnp.sum(weights * mean, axis=0) / jnp.maximum(total, 1.0)
  var = jnp.sum(weights * var, axis=0) / jnp.maximum(total, 1.0)
  if spec.axis_names:
    mean, var = jax.lax.pmean((mean, var), spec.axis_names, axis_index_groups=spec.axis_index_groups)
  return y.reshape(x.shape), mean, var, total


def normalize(
  x, mean, var, params: types.BatchNormParams | None = None, *, axis: types.Axis = -1, epsilon: float = 1e-5
):
  """`y = scale * (x - mean) / sqrt(var + epsilon) + bias` with given statistics.

  This is inference mode: `mean` and `var` are fixed (e.g. the running statistics), so `y` is an
  affine function of `x` and plain autodiff gives its derivatives. Nothing is reduced, so any rank
  works, an unbatched `(F,)` input included.

  Args:
    x: floating or complex array; `axis` names its feature axis or axes.
    mean: array of the feature shape.
    var: array of the feature shape.
    params: `BatchNormParams`, or None for scale 1 and bias 0.
    axis: the feature axis or axes.
    epsilon: added to the variance inside the square root.

  Returns:
    `y`, with x's shape and dtype; computed in float32 (or wider).
  """
  spec, _ = checks.spec(x, params, types.BatchStats(mean, var), axis=axis, stats_arg="")
  return _normalize(x, mean, var, params, spec, checks.check_epsilon(epsilon))


def _normalize(x, mean, var, params, spec: checks.Spec, epsilon: float):
  acc = moments_lib.accumulation_dtype(jnp.result_type(x, mean))
  real = jnp.finfo(acc).dtype
  at = functools.partial(_at_features, axes=spec.feature_axes, shape=x.shape)
  scale, bias = (None, None) if params is None else params
  inv_std = jax.lax.rsqrt(at(var, dtype=real) + epsilon)
  return _normalize_with(x, at(mean, dtype=acc), inv_std, _maybe(at, scale, dtype=real), _maybe(at, bias, dtype=acc))


def _train(x, params, mask, spec: checks.Spec, epsilon: float, virtual_batch_size):
  """Training-mode `(y, batch mean, batch var, count)`, the statistics of the feature shape."""
  scale, bias = (None, None) if params is None else params
  if virtual_batch_size is None:
    y, mean, var, count = _train_normalize(x, scale, bias, mask, spec, epsilon)
  else:
    y, mean, var, count = _ghost_normalize(x, scale, bias, mask, spec, epsilon, virtual_batch_size)
  count = jnp.broadcast_to(count, var.shape).reshape(spec.feature_shape)
  return y, mean.reshape(spec.feature_shape), var.reshape(spec.feature_shape), count


def batch_norm(
  x,
  params: types.BatchNormParams | None,
  stats: types.BatchStats,
  *,
  train: bool,
  axis: types.Axis = -1,
  decay=0.99,
  epsilon: float = 1e-5,
  axis_name: types.AxisName = None,
  axis_index_groups=None,
  mask=None,
  virtual_batch_size: int | None = None,
  unbiased_running_var: bool = False,
  running: str = "ema",
  allow_batch_of_one: bool = False,
) -> tuple[jax.Array, types.BatchStats]:
  """Batch normalization, training or inference mode, as one pure function.

  `train=True` normalizes with the batch's mean and biased variance (Algorithm 1 of Ioffe &
  Szegedy 2015) and returns the running statistics moved toward them; `train=False` normalizes with
  the running statistics and returns `stats` unchanged.

  Args:
    x: floating or complex array, e.g. `(N, D)`, `(N, T, D)`, NHWC (`axis=-1`) or NCHW (`axis=1`),
      or one `(D,)` example under `vmap(..., axis_name=...)`. Complex inputs get a complex mean and
      the real variance `E|x - mean|^2`.
    params: `BatchNormParams(scale, bias)` of the feature shape (None fields: no scale / bias).
    stats: `BatchStats(mean, var, count)` of the feature shape.
    train: batch statistics (True) or running statistics (False). A Python bool.
    axis: the feature axis or axes; every other axis is reduced.
    decay: running average weight, `r <- decay * r + (1 - decay) * batch` (Flax's and Keras's
      `momentum`, Haiku's `decay_rate`; PyTorch's `momentum` is `1 - decay`).
    epsilon: added to the variance inside the square root.
    axis_name: a mapped axis name (or tuple of names) to compute statistics of the whole batch
      across devices (pmap, shard_map, vmap with axis_name). Not needed under a sharded jit.
      `()` keeps per-device statistics on purpose.
    axis_index_groups: sync only within these groups of indices of `axis_name`.
    mask: boolean; x's shape without the feature axes (whole rows: statistics as if the false rows
      were dropped), or any shape broadcastable to x (each feature over its own true entries).
      Counted across devices. Every value is still normalized; a feature with no true value at all
      gives `y = bias` and keeps its running statistics. Ignored when `train=False`.
    virtual_batch_size: ghost batch norm: axis 0 is split into groups of this many rows, each
      normalized with its own statistics (local to each device); the running statistics move toward
      the groups' average.
    unbiased_running_var: store `m / (m - 1) * var` in the running variance (Algorithm 2, PyTorch).
    running: `"ema"`, `"ema_debiased"` or `"cumulative"` (see `bnjax.RUNNING_RULES`).
    allow_batch_of_one: accept a training call with one value per feature (across every reduced
      axis, named axis and device): its variance is 0, so `y = bias`. Off by default, as in
      PyTorch, since it is usually a mistake; the Flax layers turn it on, as Flax builds models
      on dummy batches of one.

  Returns:
    `(y, new_stats)`: y with x's shape and dtype; new_stats like `stats`.

  Raises:
    ValueError: a shape, axis, mask or value out of range; the message names the argument.
    TypeError: an argument of the wrong type or dtype.
    NameError: an `axis_name` that no enclosing `shard_map`, `pmap` or `vmap` binds.
  """
  if not isinstance(train, bool):
    raise TypeError(f"`train` must be a Python bool (it selects the computation), got {train!r}.")
  checks.check_stats(stats, running)
  checks.check_decay(decay)
  checks.check_bool(unbiased_running_var, "unbiased_running_var")
  epsilon = checks.check_epsilon(epsilon)
  if not train:
    spec, _ = checks.spec(x, params, stats, axis=axis, mask=mask)
    return _normalize(x, stats.mean, stats.var, params, spec, epsilon), stats
  spec, mask = checks.train_spec(
    x,
    params,
    stats,
    axis=axis,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    mask=mask,
    virtual_batch_size=virtual_batch_size,
    allow_batch_of_one=allow_batch_of_one,
  )
  y, mean, var, count = _train(x, params, mask, spec, epsilon, virtual_batch_size)
  if unbiased_running_var:
    var = var * (count / jnp.maximum(count - 1.0, 1.0))
  has_values = None if mask is None else count > 0
  return y, running_lib.update(stats, mean, var, decay=decay, running=running, has_rows=has_values)
