"""Inference-time transformations: folding batch norm into the preceding Dense layer.

In inference mode batch norm is the affine map `y = a * z + c` per feature, with
`a = scale / sqrt(var + epsilon)` and `c = bias - mean * a`. After a Dense layer `z = x W + b`:

  y = x (W * a) + (b - mean) * a + bias,

one matmul instead of a matmul and a normalization.
"""
from typing import Optional

import jax.numpy as jnp

from bnjax._src import checks
from bnjax._src import types


def fold_dense(kernel, bias, params: Optional[types.BatchNormParams], stats: types.BatchStats, *,
               epsilon: float = 1e-5):
  """Kernel and bias of one Dense layer equal to `Dense(kernel, bias)` then eval-mode batch norm.

  Args:
    kernel: `(in_features, out_features)`.
    bias: `(out_features,)`, or None for a Dense without bias (batch norm's bias replaces it).
    params: the batch norm's `BatchNormParams`, over the `out_features` axis.
    stats: the batch norm's `BatchStats`, over the `out_features` axis.
    epsilon: the batch norm's epsilon.

  Returns:
    `(folded_kernel, folded_bias)`, shapes `(in_features, out_features)` and `(out_features,)`.
  """
  epsilon = checks.check_epsilon(epsilon)
  out_features = kernel.shape[-1]
  for name, value in (("stats.mean", stats.mean), ("stats.var", stats.var),
                      ("bias", bias), ("params.scale", None if params is None else params.scale),
                      ("params.bias", None if params is None else params.bias)):
    if value is not None and tuple(jnp.shape(value)) != (out_features,):
      raise ValueError(f"`{name}` has shape {tuple(jnp.shape(value))}, expected ({out_features},) "
                       f"to match the kernel's output features (kernel shape {kernel.shape}).")
  a = 1.0 / jnp.sqrt(stats.var + epsilon)
  if params is not None and params.scale is not None:
    a = a * params.scale
  dense_bias = 0.0 if bias is None else bias
  folded_bias = (dense_bias - stats.mean) * a
  if params is not None and params.bias is not None:
    folded_bias = folded_bias + params.bias
  return (kernel * a).astype(kernel.dtype), folded_bias.astype(kernel.dtype)
