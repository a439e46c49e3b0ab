"""Batch renormalization and precise population statistics.

Batch renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence
in Batch-Normalized Models", arXiv:1702.03275) corrects the batch statistics toward the running
ones, per feature, with factors treated as constants by the gradient:

  sigma_B = sqrt(var_B + eps),   sigma = sqrt(var + eps)              (running var)
  r = stop_gradient(clip(sigma_B / sigma, 1 / rmax, rmax))
  d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
  y = scale * ((x - mu_B) / sigma_B * r + d) + bias

`rmax = 1, dmax = 0` is batch norm. Precise statistics (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", arXiv:2105.07576, PreciseBN) replace the exponential average by the plain average of
the batch statistics of many batches, computed with the model's weights frozen.
"""

from collections.abc import Callable
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from bnjax._src import batch_norm as batch_norm_lib
from bnjax._src import checks
from bnjax._src import moments as moments_lib
from bnjax._src import types


def batch_renorm(
  x,
  params: types.BatchNormParams | None,
  stats: types.BatchStats,
  *,
  train: bool,
  rmax=3.0,
  dmax=5.0,
  axis: types.Axis = -1,
  decay=0.99,
  epsilon: float = 1e-5,
  axis_name: types.AxisName = None,
  axis_index_groups=None,
  mask=None,
):
  """Batch renormalization: batch norm whose batch statistics are corrected toward the running ones.

  The arguments other than `rmax` and `dmax` are those of `bnjax.batch_norm`.

  Args:
    rmax: bound on the scale correction `r`, >= 1 (a float or a scalar array, e.g. a schedule
      from 1 to 3 over training, computed by the caller).
    dmax: bound on the shift correction `d`, >= 0 (likewise).

  Returns:
    `(y, new_stats)`; inference mode is batch norm's.
  """
  if not train:
    return batch_norm_lib.batch_norm(x, params, stats, train=False, axis=axis, epsilon=epsilon)
  for name, value, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
    bound = checks.static_value(value)
    if bound is not None and not bound >= low:
      raise ValueError(f"`{name}` must be >= {low:g}, got {value}.")
  checks.check_stats(stats)
  spec, mask_full = checks.spec(
    x, params, stats, axis=axis, axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask
  )
  batch_mean, batch_var, _ = moments_lib.batch_moments(jax.lax.stop_gradient(x), mask_full, spec)
  batch_mean = batch_mean.reshape(spec.feature_shape)
  batch_var = batch_var.reshape(spec.feature_shape)
  running_sigma = jnp.sqrt(stats.var + epsilon)
  r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(batch_var + epsilon) / running_sigma, 1.0 / rmax, rmax))
  d = jax.lax.stop_gradient(jnp.clip((batch_mean - stats.mean) / running_sigma, -dmax, dmax))
  scale = None if params is None else params.scale
  bias = None if params is None else params.bias
  # scale * (x_hat * r + d) + bias is batch norm with scale' = scale * r and bias' = bias + scale * d.
  scale_r = r if scale is None else scale * r.astype(scale.dtype)
  shift = d if scale is None else scale * d.astype(scale.dtype)
  bias_d = shift if bias is None else bias + shift
  y, new_stats = batch_norm_lib.batch_norm(
    x,
    types.BatchNormParams(scale_r, bias_d),
    stats,
    train=True,
    axis=spec.feature_axes,
    decay=decay,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    mask=mask,
  )
  return y, new_stats


def precise_batch_stats(apply_fn: Callable, variables, batches: Iterable, *, unbiased_batch_size: int | None = None):
  """Population statistics of every batch-norm layer of a model: the average over `batches`.

  The running averages of batch norm lag behind the weights and weigh recent batches more; with
  the weights frozen, the plain average of the per-batch statistics over many batches estimates the
  population statistics better (the paper's Algorithm 2, PreciseBN).

  `apply_fn(variables, x)` must run the model in training mode and return
  `(outputs, new_batch_stats)`, where each running statistic follows an exponential average
  `new = decay * old + (1 - decay) * batch` (bnjax.nn.BatchNorm, flax.linen.BatchNorm, or
  bnjax.batch_norm with `running="ema"`). Training mode's outputs do not depend on the running
  statistics, so applying the model from running statistics of all zeros and of all ones recovers
  every layer's batch statistic exactly, whatever its decay: `batch = new_0 / (1 - decay)`, with
  `decay = new_1 - new_0`.

  Args:
    apply_fn: `(variables, x) -> (outputs, new_batch_stats)`, training mode.
    variables: a dict with a `"batch_stats"` entry (the tree that apply_fn returns updated).
    batches: an iterable of inputs `x` for apply_fn.
    unbiased_batch_size: if given, the averaged variances (leaves named `var`) are multiplied by
      `m / (m - 1)` with m this value (Algorithm 2's unbiased estimate; m counts the elements that
      enter each statistic, e.g. N * H * W for images).

  Returns:
    A tree like `variables["batch_stats"]` holding the averaged statistics.
  """
  if "batch_stats" not in variables:
    raise ValueError(f"`variables` must hold a 'batch_stats' collection, got keys {sorted(variables)}.")
  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  ones = jax.tree.map(jnp.ones_like, variables["batch_stats"])

  @jax.jit
  def batch_statistics(x):
    _, from_zeros = apply_fn({**variables, "batch_stats": zeros}, x)
    _, from_ones = apply_fn({**variables, "batch_stats": ones}, x)
    return jax.tree.map(lambda n0, n1: n0 / jnp.maximum(1.0 - (n1 - n0), 1e-12), from_zeros, from_ones)

  total, count = None, 0
  for x in batches:
    stats = batch_statistics(x)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if count == 0:
    raise ValueError("`batches` yielded no batch: pass at least one.")
  average = jax.tree.map(lambda t: t / count, total)
  if unbiased_batch_size is not None:
    if unbiased_batch_size < 2:
      raise ValueError(f"`unbiased_batch_size` must be >= 2, got {unbiased_batch_size}.")
    factor = unbiased_batch_size / (unbiased_batch_size - 1)
    average = jax.tree_util.tree_map_with_path(
      lambda path, v: v * factor if getattr(path[-1], "key", None) == "var" else v, average
    )
  return average
