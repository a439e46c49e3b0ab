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
import warnings
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from bnjax._src import cpu_kernel
from bnjax._src import errors
from bnjax._src import moments as moments_lib
from bnjax._src import running as running_lib
from bnjax._src import types


def init(feature_shape: Union[int, Sequence[int]], *, dtype=jnp.float32, use_scale: bool = True,
         use_bias: bool = True) -> Tuple[types.BatchNormParams, types.BatchStats]:
  """Fresh parameters (scale 1, bias 0) and running statistics (mean 0, var 1, count 0).

  Args:
    feature_shape: the sizes of x's feature axes, e.g. `D` for `(N, D)`, `C` for NHWC or NCHW.
    dtype: the parameters' dtype. Running statistics are float32 (float64 for float64 params).
    use_scale, use_bias: False gives None in that field (scale 1, bias 0, nothing learned).

  Returns:
    `(BatchNormParams(scale, bias), BatchStats(mean, var, count))`.
  """
  shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
  if not all(isinstance(d, int) and d > 0 for d in shape):
    raise ValueError(f"`feature_shape` must be a positive int or a tuple of them, got {feature_shape!r}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
  stats_dtype = jnp.promote_types(dtype, jnp.float32)
  params = types.BatchNormParams(
      scale=jnp.ones(shape, dtype) if use_scale else None,
      bias=jnp.zeros(shape, dtype) if use_bias else None)
  stats = types.BatchStats(
      mean=jnp.zeros(shape, stats_dtype), var=jnp.ones(shape, stats_dtype),
      count=jnp.zeros((), jnp.int32))
  return params, stats


def _broadcast_to_axes(value, ndim: int, axes: Tuple[int, ...], shape):
  """A feature-shaped array laid out to broadcast against an array of rank `ndim`."""
  return value.reshape(tuple(shape[i] if i in axes else 1 for i in range(ndim)))


def _affine_terms(scale, bias, x_ndim, param_axes, x_shape, acc):
  scale_b = None if scale is None else _broadcast_to_axes(scale.astype(acc), x_ndim, param_axes, x_shape)
  bias_b = None if bias is None else _broadcast_to_axes(bias.astype(acc), x_ndim, param_axes, x_shape)
  return scale_b, bias_b


def _normalize_with(x, mean, inv_std, scale_b, bias_b):
  """`(x - mean) * (scale * inv_std) + bias` in the accumulation dtype, cast back to x's dtype."""
  acc = mean.dtype
  multiplier = inv_std if scale_b is None else scale_b * inv_std
  y = (moments_lib.upcast(x, acc, 2) - mean) * multiplier
  if bias_b is not None:
    y = y + bias_b
  return y.astype(x.dtype)


def _train_forward(x, scale, bias, mask, stat_axes, param_axes, axis_name, axis_index_groups,
                   epsilon):
  mean, var, count = moments_lib.raw_moments(
      x, stat_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
  inv_std = jax.lax.rsqrt(var + epsilon)
  scale_b, bias_b = _affine_terms(scale, bias, x.ndim, param_axes, x.shape, mean.dtype)
  y = _normalize_with(x, mean, inv_std, scale_b, bias_b)
  return y, mean, var, count, inv_std


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7, 8))
def _train_normalize(x, scale, bias, mask, stat_axes, param_axes, axis_name, axis_index_groups,
                     epsilon):
  y, mean, var, count, _ = _train_forward(x, scale, bias, mask, stat_axes, param_axes, axis_name,
                                          axis_index_groups, epsilon)
  return y, mean, var, count


def _is_zero(t) -> bool:
  return t is None or isinstance(t, SymbolicZero)


def _train_tangents(x, mean, inv_std, count, scale, mask, tx, tscale, tbias, *, stat_axes,
                    param_axes, axis_name, axis_index_groups):
  """The linear tangent map of training-mode batch norm (see the module docstring)."""
  acc = mean.dtype
  red = moments_lib.reduction_axes(x.ndim, stat_axes)
  x_hat = (moments_lib.upcast(x, acc, 3) - mean) * inv_std
  scale_b, _ = _affine_terms(scale, None, x.ndim, param_axes, x.shape, acc)
  # y's tangent is written as  gain * tx + offset + slope * x_hat,  with `offset` and `slope`
  # per-feature, so that its transpose (reverse mode) needs exactly two full-size reductions,
  # sum(dy) and sum(dy * x_hat), and one elementwise pass for dx.
  offset = jnp.zeros_like(mean)
  slope = jnp.zeros_like(mean)
  ty = None
  t_mean = jnp.zeros_like(mean)
  t_var = jnp.zeros_like(mean)
  if tx is not None:
    tx = tx.astype(acc)
    tx_rows = tx if mask is None else jnp.where(mask, tx, 0.0)
    sum_t, sum_t_xhat = moments_lib.sync_sum(
        (jnp.sum(tx_rows, axis=red, keepdims=True),
         jnp.sum(tx_rows * x_hat, axis=red, keepdims=True)),
        axis_name, axis_index_groups)
    safe_count = jnp.maximum(count, 1.0)
    t_mean = sum_t / safe_count
    t_proj = sum_t_xhat / safe_count
    gain = inv_std if scale_b is None else scale_b * inv_std
    ty = gain * tx
    offset = offset - gain * t_mean
    slope = slope - gain * t_proj
    t_var = 2.0 * t_proj / inv_std
  if tscale is not None:
    slope = slope + _broadcast_to_axes(tscale.astype(acc), x.ndim, param_axes, x.shape)
  if tbias is not None:
    offset = offset + _broadcast_to_axes(tbias.astype(acc), x.ndim, param_axes, x.shape)
  # (x - mean) rather than x_hat: inv_std is folded into the per-feature slope, so the reduction
  # sum(dy * (x - mean)) fuses with its operands (XLA:CPU does not fuse the doubly broadcast x_hat).
  slope_centered = slope * inv_std
  # The barrier keeps XLA from fusing mean's own arithmetic into the subtraction, which would stop
  # the reduction over dy * (x - mean) from fusing (XLA:CPU), costing a full-size temporary.
  centered = moments_lib.upcast(x, acc, 4) - jax.lax.optimization_barrier(mean)
  ty = moments_lib.downcast_sum((ty, offset, slope_centered * centered), x.dtype, x.shape)
  return ty, t_mean, t_var


@_train_normalize.defjvp
def _train_normalize_jvp(stat_axes, param_axes, axis_name, axis_index_groups, epsilon, primals,
                         tangents):
  x, scale, bias, mask = primals
  tx, tscale, tbias, _ = tangents
  y, mean, var, count, inv_std = _train_forward(
      x, scale, bias, mask, stat_axes, param_axes, axis_name, axis_index_groups, epsilon)
  tx, tscale, tbias = (None if _is_zero(t) else t for t in (tx, tscale, tbias))
  if tx is None and tscale is None and tbias is None:
    zeros = jnp.zeros_like(mean)
    return (y, mean, var, count), (jnp.zeros_like(y), zeros, zeros, jnp.zeros_like(count))
  # Rematerialised so that reverse mode recomputes x_hat from x instead of storing it.
  tangent_map = jax.checkpoint(functools.partial(
      _train_tangents, stat_axes=stat_axes, param_axes=param_axes, axis_name=axis_name,
      axis_index_groups=axis_index_groups))
  ty, t_mean, t_var = tangent_map(x, mean, inv_std, count, scale, mask, tx, tscale, tbias)
  return (y, mean, var, count), (ty, t_mean, t_var, jnp.zeros_like(count))


_train_normalize.defjvp(_train_normalize_jvp, symbolic_zeros=True)


# The same training-mode function with the CPU kernels' reductions (`implementation="cpu_kernel"`).
# A custom_vjp, not a custom_jvp: XLA cannot transpose a kernel, so the backward is written out. It
# is the transpose of `_train_tangents` (module docstring): sum(g) and sum(g * (x - mu)), then dx, in
# one kernel call on one device's batch; with an axis_name, the sums' kernel, an all-reduce, then dx.
def _kernel_forward(x, scale, bias, view, param_axes, axis_name, axis_index_groups, epsilon):
  stat_shape = tuple(x.shape[i] if i in param_axes else 1 for i in range(x.ndim))
  local_mean, local_m2 = cpu_kernel.moments(x.reshape(view))
  n_local = jnp.asarray(view[0] * view[2], jnp.float32)
  mean, var, count = moments_lib.combine(
      n_local, local_mean.reshape(stat_shape), local_m2.reshape(stat_shape), axis_name,
      axis_index_groups, same_count=True)
  inv_std = jax.lax.rsqrt(var + epsilon)
  scale_b, bias_b = _affine_terms(scale, bias, x.ndim, param_axes, x.shape, mean.dtype)
  y = _normalize_with(x, mean, inv_std, scale_b, bias_b)
  return (y, mean, var, count), (x, mean, inv_std, count, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _train_normalize_kernel(x, scale, bias, view, param_axes, axis_name, axis_index_groups,
                            epsilon):
  return _kernel_forward(x, scale, bias, view, param_axes, axis_name, axis_index_groups,
                         epsilon)[0]


def _kernel_backward(view, param_axes, axis_name, axis_index_groups, epsilon, residuals,
                     cotangents):
  del epsilon
  x, mean, inv_std, count, scale, bias = residuals
  g, g_mean, g_var, _ = cotangents
  scale_b, _ = _affine_terms(scale, None, x.ndim, param_axes, x.shape, mean.dtype)
  gain = inv_std if scale_b is None else scale_b * inv_std
  safe_count = jnp.maximum(count, 1.0)
  # Cotangents follow the types of their primals, as JAX's own transposition does. Under shard_map
  # (x typed as varying) a parameter or statistic invariant over the synchronised axes gets the
  # whole batch's sum; a varying one, and everything under pmap and vmap (no such types), keeps
  # this device's share, and a statistic's cotangent is summed as psum's transpose sums it.
  typed = bool(errors.varying_axes(x))
  names = set() if axis_name is None or axis_name == () else (
      {axis_name} if isinstance(axis_name, str) else set(axis_name))
  def param_sum(local, whole, param):
    return whole if typed and not (names & errors.varying_axes(param)) else local
  def stat_total(ct):
    return ct if typed else moments_lib.sync_sum(ct, axis_name, axis_index_groups)

  # dx = gain * g + offset + slope * (x - mean), per feature:
  mean_coef = gain / safe_count                          # offset = offset0 - mean_coef * sum(g)
  proj_coef = gain * inv_std * inv_std / safe_count      # slope = slope0 - proj_coef * sum(g (x - mean))
  offset0 = stat_total(g_mean) / safe_count
  slope0 = 2.0 * stat_total(g_var) / safe_count
  coefficients = [jnp.broadcast_to(v, mean.shape).reshape(-1)
                  for v in (mean, gain, mean_coef, proj_coef, offset0, slope0)]
  x3, g3 = x.reshape(view), g.astype(x.dtype).reshape(view)
  if not names:
    # One device's batch: the sums and dx in a single kernel call.
    dx3, local_sum_g, local_sum_gc = cpu_kernel.backward(x3, g3, *coefficients)
    sum_g, sum_gc = local_sum_g, local_sum_gc
  else:
    local_sum_g, local_sum_gc = cpu_kernel.backward_sums(x3, g3, coefficients[0])
    sum_g, sum_gc = moments_lib.sync_sum((local_sum_g, local_sum_gc), axis_name,
                                         axis_index_groups)
    dx3 = cpu_kernel.dx_from_sums(x3, g3, *coefficients, sum_g, sum_gc)
  dx = dx3.reshape(x.shape)
  local_sum_g, local_sum_gc, sum_g, sum_gc = (
      v.reshape(mean.shape) for v in (local_sum_g, local_sum_gc, sum_g, sum_gc))

  feature_shape = tuple(x.shape[a] for a in param_axes)
  def param_ct(param, local, whole):
    if param is None:
      return None
    return param_sum(local, whole, param).reshape(feature_shape).astype(param.dtype)
  d_scale = param_ct(scale, local_sum_gc * inv_std, sum_gc * inv_std)
  d_bias = param_ct(bias, local_sum_g, sum_g)
  return dx, d_scale, d_bias


_train_normalize_kernel.defvjp(_kernel_forward, _kernel_backward)


def _kernel_view(implementation, x, axes, mask, virtual_batch_size):
  """x's `(A, C, B)` view when `implementation` asks for the CPU kernels and they apply, else None.

  They apply on the CPU backend to float32 inputs whose feature axes are adjacent,
  without `mask` or `virtual_batch_size`; everything else takes the pure-JAX path, which computes
  the same function.
  """
  if implementation != "cpu_kernel":
    return None
  if (mask is not None or virtual_batch_size is not None or jax.default_backend() != "cpu"
      or jnp.dtype(x.dtype) not in cpu_kernel.SUPPORTED_DTYPES):
    return None
  view = cpu_kernel.view_of(x.shape, axes)
  if view is None:
    return None
  reason = cpu_kernel.unavailable_reason()
  if reason is not None:
    _warn_kernel_unavailable(reason)
    return None
  return view


@functools.cache
def _warn_kernel_unavailable(reason: str) -> None:
  warnings.warn(f"implementation='cpu_kernel' falls back to the pure-JAX path: {reason}",
                RuntimeWarning, stacklevel=4)


def _check_variables(x, axes, params, stats):
  feature_shape = tuple(x.shape[a] for a in axes)
  if params is not None:
    errors.check_feature_shape(params, ("scale", "bias"), feature_shape, arg="params",
                               x_shape=x.shape, axes=axes)
  if stats is not None:
    errors.check_feature_shape(stats, ("mean", "var"), feature_shape, arg="stats",
                               x_shape=x.shape, axes=axes)
  return feature_shape


def _params_or_none(params):
  if params is None:
    return None, None
  return params.scale, params.bias


def normalize(x, mean, var, params: Optional[types.BatchNormParams] = None, *,
              axis: types.Axis = -1, epsilon: float = 1e-5):
  """`y = scale * (x - mean) / sqrt(var + epsilon) + bias` with given statistics.

  This is inference mode: `mean` and `var` are fixed (e.g. the running statistics), so `y` is an
  affine function of `x` and plain autodiff gives its derivatives.

  Args:
    x: floating array; `axis` names its feature axis or axes.
    mean, var: arrays of the feature shape.
    params: `BatchNormParams`, or None for scale 1 and bias 0.
    axis: the feature axis or axes.
    epsilon: added to the variance inside the square root.

  Returns:
    `y`, with x's shape and dtype; computed in float32 (or wider).
  """
  errors.check_floating(x)
  errors.check_epsilon(epsilon)
  axes = errors.feature_axes(axis, x.ndim)
  feature_shape = _check_variables(x, axes, params, None)
  for name, value in (("mean", mean), ("var", var)):
    if tuple(jnp.shape(value)) != feature_shape:
      raise ValueError(f"`{name}` has shape {tuple(jnp.shape(value))}, expected x's feature shape "
                       f"{feature_shape} along axis {axis}.")
  acc = moments_lib.accumulation_dtype(jnp.result_type(x, mean, var))
  mean_b = _broadcast_to_axes(jnp.asarray(mean, acc), x.ndim, axes, x.shape)
  var_b = _broadcast_to_axes(jnp.asarray(var, acc), x.ndim, axes, x.shape)
  scale, bias = _params_or_none(params)
  scale_b, bias_b = _affine_terms(scale, bias, x.ndim, axes, x.shape, acc)
  return _normalize_with(x, mean_b, jax.lax.rsqrt(var_b + epsilon), scale_b, bias_b)


def batch_norm(x, params: Optional[types.BatchNormParams], stats: types.BatchStats, *, train: bool,
               axis: types.Axis = -1, decay=0.99, epsilon: float = 1e-5,
               axis_name: types.AxisName = None, axis_index_groups=None, mask=None,
               virtual_batch_size: Optional[int] = None, unbiased_running_var: bool = False,
               running: str = "ema", implementation: Optional[str] = None
               ) -> Tuple[jax.Array, types.BatchStats]:
  """Batch normalization, training or inference mode, as one pure function.

  `train=True` normalizes with the batch's mean and biased variance (Algorithm 1 of Ioffe &
  Szegedy 2015) and returns the running statistics moved toward them; `train=False` normalizes with
  the running statistics and returns `stats` unchanged.

  Args:
    x: floating array, e.g. `(N, D)`, `(N, T, D)`, NHWC (`axis=-1`) or NCHW (`axis=1`).
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
    mask: boolean of x's shape without the feature axes; statistics count only true rows, as if
      the false rows were dropped (across devices too). Every row is still normalized.
    virtual_batch_size: ghost batch norm: axis 0 is split into groups of this many rows, each
      normalized with its own statistics (local to each device); the running statistics move toward
      the groups' average.
    unbiased_running_var: store `m / (m - 1) * var` in the running variance (Algorithm 2, PyTorch).
    running: `"ema"`, `"ema_debiased"` or `"cumulative"` (see `bnjax._src.running`).
    implementation: how training mode computes its reductions. None or `"xla"`: pure JAX, on every
      backend. `"cpu_kernel"`: on the CPU backend, bnjax's XLA FFI kernels compute the moments and
      the backward's two sums in one read each (built with the system C++ compiler on first use,
      see `bnjax.build_cpu_kernels`); its derivative is a custom VJP: first-order reverse mode
      (`grad`, `vjp`) only, no `jvp`, `hessian` or grad of grad (use the default for those).
      Inputs they do not cover (other backends, dtypes other than float32,
      non-adjacent feature axes, `mask`, `virtual_batch_size`) take the pure-JAX path, and so does
      everything if the kernels cannot be built (with a warning).

  Returns:
    `(y, new_stats)`: y with x's shape and dtype; new_stats like `stats`.

  Raises:
    ValueError / TypeError / NameError naming the argument that is wrong.
  """
  errors.check_floating(x)
  axes = errors.feature_axes(axis, x.ndim)
  errors.check_stats_present(stats)
  _check_variables(x, axes, params, stats)
  errors.check_decay(decay)
  errors.check_epsilon(epsilon)
  running_lib.check_running(running, stats)
  if mask is not None:
    mask = errors.mask_to_input_rank(mask, x.shape, axes)
  if not isinstance(train, bool):
    raise TypeError(f"`train` must be a Python bool (it selects the computation), got {train!r}.")
  errors.check_implementation(implementation)
  if not train:
    return normalize(x, stats.mean, stats.var, params, axis=axes, epsilon=epsilon), stats

  if axis_name is None:
    errors.check_mapped_axes(x, axis_name)
  participants = errors.axis_size(axis_name, axis_index_groups)
  errors.check_virtual_batch_size(virtual_batch_size, x.shape, axes)
  rows = math.prod(d for i, d in enumerate(x.shape) if i not in axes)
  if virtual_batch_size is None:
    rows *= participants
  else:
    rows = rows // x.shape[0] * virtual_batch_size
  if rows < 2:
    where = (f" (counted across the {participants} devices of axis_name={axis_name!r})"
             if participants > 1 and virtual_batch_size is None else "")
    raise ValueError(
        f"batch_norm(train=True) got {rows} value per feature to compute statistics over{where}: "
        f"x has shape {x.shape} with feature axes {axes}"
        + (f" and virtual_batch_size={virtual_batch_size}" if virtual_batch_size else "")
        + ". A batch of one has zero variance and normalizes every feature to 0. Use a larger "
        "batch, or train=False to use the running statistics.")

  scale, bias = _params_or_none(params)
  if virtual_batch_size is None:
    xg, mask_g, stat_axes, param_axes = x, mask, axes, axes
    stat_axis_name = axis_name
  else:
    groups = x.shape[0] // virtual_batch_size
    xg = x.reshape((groups, virtual_batch_size) + x.shape[1:])
    mask_g = None if mask is None else mask.reshape((groups, virtual_batch_size) + mask.shape[1:])
    param_axes = tuple(a + 1 for a in axes)
    stat_axes = (0,) + param_axes
    stat_axis_name = None  # ghost batches are local to each device
  groups_arg = None if axis_index_groups is None else tuple(tuple(g) for g in axis_index_groups)
  groups_arg = groups_arg if stat_axis_name is not None else None
  view = _kernel_view(implementation, x, axes, mask, virtual_batch_size)
  if view is None:
    y, mean, var, count = _train_normalize(xg, scale, bias, mask_g, stat_axes, param_axes,
                                           stat_axis_name, groups_arg, float(epsilon))
  else:
    y, mean, var, count = _train_normalize_kernel(x, scale, bias, view, axes, axis_name,
                                                  groups_arg, float(epsilon))
  y = y.reshape(x.shape)

  if unbiased_running_var:
    var = var * (count / jnp.maximum(count - 1.0, 1.0))
  feature_shape = tuple(x.shape[a] for a in axes)
  if virtual_batch_size is None:
    batch_mean, batch_var = mean.reshape(feature_shape), var.reshape(feature_shape)
    has_rows = None if mask is None else jnp.max(count) > 0
  else:
    weights = jnp.broadcast_to(count, mean.shape)
    total = jnp.sum(weights, axis=0)
    has_rows = None if mask is None else jnp.max(total) > 0
    batch_mean = jnp.sum(weights * mean, axis=0) / jnp.maximum(total, 1.0)
    batch_var = jnp.sum(weights * var, axis=0) / jnp.maximum(total, 1.0)
    if axis_name is not None and axis_name != ():
      batch_mean, batch_var = jax.lax.pmean((batch_mean, batch_var), axis_name,
                                            axis_index_groups=axis_index_groups)
    batch_mean, batch_var = batch_mean.reshape(feature_shape), batch_var.reshape(feature_shape)
  new_stats = running_lib.update(stats, batch_mean, batch_var, decay=decay, running=running,
                                 has_rows=has_rows)
  return y, new_stats
