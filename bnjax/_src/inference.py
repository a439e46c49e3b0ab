"""Inference-time transformations: folding batch norm into the preceding Dense or convolution.

In inference mode batch norm is the affine map `y = a * (z - mean) + beta` per output feature, with
`a = scale / sqrt(var + epsilon)`. After a layer `z = u + b`, where `u` is linear in its input (`x W`
for a Dense, `conv(x, W)` for a convolution, each output feature from its own slice of `W`):

  y = a * u + (b - mean) * a + beta,

which is the same layer with its kernel's output slices multiplied by `a` and the bias
`(b - mean) * a + beta`: one layer instead of a layer and a normalization.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src import checks
from bnjax._src import types


def _check_features(kernel, bias, params, stats, out_axis: int, how: str) -> None:
  """Every per-feature array has shape `(F,)`, F the size of the kernel's output axis."""
  features = kernel.shape[out_axis]
  for name, value in (
    ("stats.mean", stats.mean),
    ("stats.var", stats.var),
    ("bias", bias),
    ("params.scale", None if params is None else params.scale),
    ("params.bias", None if params is None else params.bias),
  ):
    if value is not None and tuple(np.shape(value)) != (features,):
      raise ValueError(
        f"`{name}` has shape {tuple(np.shape(value))}, expected ({features},): the kernel (shape "
        f"{tuple(kernel.shape)}) has {features} output features along {how}."
      )


def _eval_affine(bias, params, stats, epsilon: float):
  """Per-feature `(a, folded_bias)`: `a = scale / sqrt(var + epsilon)`, `(b - mean) * a + beta`."""
  acc = jnp.promote_types(jnp.result_type(stats.var), jnp.float32)
  a = 1.0 / jnp.sqrt(jnp.asarray(stats.var, acc) + epsilon)
  if params is not None and params.scale is not None:
    a = a * jnp.asarray(params.scale, acc)
  # (b - mean) before the product: a bias close to the mean cancels exactly, as in the unfolded layers.
  folded_bias = (jnp.asarray(0.0 if bias is None else bias, acc) - jnp.asarray(stats.mean, acc)) * a
  if params is not None and params.bias is not None:
    folded_bias = folded_bias + jnp.asarray(params.bias, acc)
  return a, folded_bias


def _fold(kernel, bias, params, stats, epsilon: float, out_axis: int):
  a, folded_bias = _eval_affine(bias, params, stats, epsilon)
  at_out = tuple(-1 if i == out_axis else 1 for i in range(kernel.ndim))
  folded_kernel = jnp.asarray(kernel, a.dtype) * a.reshape(at_out)
  return folded_kernel.astype(kernel.dtype), folded_bias.astype(kernel.dtype)


def _check_kernel(kernel) -> None:
  if not hasattr(kernel, "shape") or not hasattr(kernel, "dtype"):
    raise TypeError(f"`kernel` must be an array, got {type(kernel).__name__}.")
  checks.check_inexact(kernel, arg="kernel")


def fold_dense(kernel, bias, params: types.BatchNormParams | None, stats: types.BatchStats, *, epsilon: float = 1e-5):
  """Kernel and bias of one Dense layer equal to `Dense(kernel, bias)` then eval-mode batch norm.

  With `a = scale / sqrt(var + epsilon)` per output feature: `kernel * a` and `(bias - mean) * a + beta`.

  Args:
    kernel: `(in_features, out_features)`.
    bias: `(out_features,)`, or None for a Dense without bias (batch norm's bias replaces it).
    params: the batch norm's `BatchNormParams`, over the `out_features` axis (None: scale 1, bias 0).
    stats: the batch norm's `BatchStats`, over the `out_features` axis.
    epsilon: the batch norm's epsilon.

  Returns:
    `(folded_kernel, folded_bias)`, shapes `(in_features, out_features)` and `(out_features,)`, in the
    kernel's dtype (computed in float32 or wider).

  Raises:
    ValueError: a kernel that is not 2-D, or a per-feature array whose shape is not `(out_features,)`.
    TypeError: a kernel that is not a floating array, or a bad `epsilon`.
  """
  epsilon = checks.check_epsilon(epsilon)
  _check_kernel(kernel)
  checks.check_stats(stats)
  if kernel.ndim != 2:
    raise ValueError(
      f"`kernel` must be 2-D `(in_features, out_features)`, got shape {tuple(kernel.shape)}; for a "
      "convolution kernel use `bnjax.fold_conv`."
    )
  _check_features(kernel, bias, params, stats, -1, "its last axis")
  return _fold(kernel, bias, params, stats, epsilon, kernel.ndim - 1)


def fold_conv(
  kernel,
  bias,
  params: types.BatchNormParams | None,
  stats: types.BatchStats,
  *,
  epsilon: float = 1e-5,
  out_axis: int = -1,
):
  """Kernel and bias of one convolution equal to that convolution then eval-mode batch norm.

  With `a = scale / sqrt(var + epsilon)` per output feature `o`: `kernel[..., o] * a[o]` (along
  `out_axis`) and `(bias - mean) * a + beta`. The batch norm must normalize the convolution's output
  features (axis -1 of an NHWC output, axis 1 of NCHW). Any spatial rank; with feature groups
  (`feature_group_count`, depthwise convolutions) the kernel's output axis still holds every output
  feature, so the same formula holds.

  Args:
    kernel: the convolution kernel: Flax's `(*spatial, in_features // groups, out_features)` (HWIO,
      `out_axis=-1`), or PyTorch's `(out_features, in_features // groups, *spatial)` (OIHW,
      `out_axis=0`).
    bias: `(out_features,)`, or None for a convolution without bias.
    params: the batch norm's `BatchNormParams`, over the output features (None: scale 1, bias 0).
    stats: the batch norm's `BatchStats`, over the output features.
    epsilon: the batch norm's epsilon.
    out_axis: the kernel's axis of output features.

  Returns:
    `(folded_kernel, folded_bias)`: the kernel's shape and `(out_features,)`, in the kernel's dtype
    (computed in float32 or wider).

  Raises:
    ValueError: `out_axis` out of range for the kernel, or a per-feature array whose shape is not
      `(out_features,)`.
    TypeError: a kernel that is not a floating array, a non-int `out_axis`, or a bad `epsilon`.
  """
  epsilon = checks.check_epsilon(epsilon)
  _check_kernel(kernel)
  checks.check_stats(stats)
  ndim = kernel.ndim
  if isinstance(out_axis, bool) or not isinstance(out_axis, (int, np.integer)):
    raise TypeError(f"`out_axis` must be an int (-1 for HWIO kernels, 0 for OIHW), got {out_axis!r}.")
  if not -ndim <= out_axis < ndim:
    raise ValueError(
      f"`out_axis`={out_axis} is out of range for a kernel of rank {ndim} (shape {tuple(kernel.shape)}): "
      f"expected an axis in [{-ndim}, {ndim - 1}], -1 for HWIO kernels, 0 for OIHW."
    )
  out_axis = int(out_axis) % ndim
  hint = "; an OIHW kernel needs out_axis=0" if out_axis == ndim - 1 else ""
  _check_features(kernel, bias, params, stats, out_axis, f"out_axis={out_axis}{hint}")
  return _fold(kernel, bias, params, stats, epsilon, out_axis)


def fold_dense_input(
  kernel, bias, params: types.BatchNormParams | None, stats: types.BatchStats, *, epsilon: float = 1e-5
):
  """Kernel and bias of one Dense layer equal to eval-mode batch norm then `Dense(kernel, bias)`.

  Batch norm is `z = a * h + c` with `c = beta - mean * a`, so `z W + b = h (a[:, None] * W) + (c W + b)`.
  Exact for a Dense; not for a padded convolution, whose zero padding is not normalized.

  Args:
    kernel: `(in_features, out_features)`; the batch norm normalizes the `in_features`.
    bias: `(out_features,)`, or None.
    params: the batch norm's `BatchNormParams` (None: scale 1, bias 0).
    stats: the batch norm's `BatchStats`.
    epsilon: the batch norm's epsilon.

  Returns:
    `(folded_kernel, folded_bias)`, in the kernel's dtype.
  """
  epsilon = checks.check_epsilon(epsilon)
  _check_kernel(kernel)
  checks.check_stats(stats)
  if kernel.ndim != 2:
    raise ValueError(f"`kernel` must be 2-D `(in_features, out_features)`, got shape {tuple(kernel.shape)}.")
  _check_features(kernel, None, params, stats, 0, "its first axis (the input features)")
  out_features = kernel.shape[1]
  if bias is not None and tuple(np.shape(bias)) != (out_features,):
    raise ValueError(f"`bias` has shape {tuple(np.shape(bias))}, expected ({out_features},).")
  a, c = _eval_affine(None, params, stats, epsilon)
  wide = jnp.asarray(kernel, a.dtype)
  # HIGHEST: accelerators otherwise round the operands of a float32 matmul to bfloat16 or TF32.
  folded_bias = jnp.dot(c, wide, precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    folded_bias = folded_bias + jnp.asarray(bias, a.dtype)
  return (a[:, None] * wide).astype(kernel.dtype), folded_bias.astype(kernel.dtype)
