"""A float64 NumPy reference for batch norm: Ioffe & Szegedy (2015), Algorithm 1 and its backward.

`batchnorm_forward` is the article's `batchnorm(x, gamma, beta, eps)` (returning `out, cache`),
generalised from `(N, D)` to any feature axes by moving them last and flattening the rest into rows.
"""

import numpy as np


def _to_rows(x, axes):
  rest = [i for i in range(x.ndim) if i not in axes]
  moved = np.transpose(x, rest + list(axes))
  feature_shape = moved.shape[len(rest) :]
  return moved.reshape(-1, int(np.prod(feature_shape))), moved.shape, rest + list(axes)


def _from_rows(rows, moved_shape, order):
  return np.transpose(rows.reshape(moved_shape), np.argsort(order))


def batchnorm(x, gamma, beta, eps=1e-5):
  """The article's NumPy code, verbatim in substance: (N, D) input, biased batch variance."""
  sample_mean = x.mean(axis=0)
  sample_var = x.var(axis=0)
  std = np.sqrt(sample_var + eps)
  x_centered = x - sample_mean
  x_norm = x_centered / std
  out = gamma * x_norm + beta
  cache = (x_norm, x_centered, std, gamma)
  return out, cache


def batchnorm_backward(dout, cache):
  """The paper's closed-form backward for `batchnorm`: (dx, dgamma, dbeta)."""
  x_norm, _, std, gamma = cache
  m = dout.shape[0]
  dbeta = dout.sum(axis=0)
  dgamma = (dout * x_norm).sum(axis=0)
  dx = gamma / std / m * (m * dout - dbeta - x_norm * dgamma)
  return dx, dgamma, dbeta


def forward_backward(x, scale, bias, dy, axes, eps=1e-5, mask=None):
  """Any layout: returns y, dx, dscale, dbias, batch mean, batch biased var (all float64).

  With `mask` (shape of x without the feature axes), statistics and gradients come from the true
  rows only; false rows are normalized with those statistics, as batch_norm does.
  """
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  axes = tuple(sorted(a % x.ndim for a in axes))
  rows, moved_shape, order = _to_rows(x, axes)
  dy_rows, _, _ = _to_rows(dy, axes)
  gamma = np.asarray(scale, np.float64).reshape(-1)
  beta = np.asarray(bias, np.float64).reshape(-1)
  keep = np.ones(rows.shape[0], bool) if mask is None else np.asarray(mask).reshape(-1)
  _, cache = batchnorm(rows[keep], gamma, beta, eps)
  x_norm_kept, x_centered, std, _ = cache
  mean = rows[keep].mean(axis=0)
  var = rows[keep].var(axis=0)
  y_rows = gamma * (rows - mean) / std + beta
  dx_rows = np.zeros_like(rows)
  dx_kept, dgamma_kept, dbeta_kept = batchnorm_backward(dy_rows[keep], cache)
  dx_rows[keep] = dx_kept
  # Masked-out rows are normalized too but do not enter the statistics: their own dx is
  # gamma / std * dy, and their outputs reach the kept rows' dx through mean and var.
  x_norm_all = (rows - mean) / std
  if mask is not None:
    drop = ~keep
    dx_rows[drop] = gamma / std * dy_rows[drop]
    # The dropped rows' outputs still depend on the kept rows through mean and std.
    m = keep.sum()
    g_mean = -(gamma / std) * dy_rows[drop].sum(axis=0)
    g_var = -0.5 * gamma * (dy_rows[drop] * x_norm_all[drop]).sum(axis=0) / (var + eps)
    dx_rows[keep] += g_mean / m + g_var * 2.0 * (rows[keep] - mean) / m
  dscale = (dy_rows * x_norm_all).sum(axis=0)
  dbias = dy_rows.sum(axis=0)
  feature_shape = tuple(x.shape[a] for a in axes)
  return dict(
    y=_from_rows(y_rows, moved_shape, order),
    dx=_from_rows(dx_rows, moved_shape, order),
    dscale=dscale.reshape(feature_shape),
    dbias=dbias.reshape(feature_shape),
    mean=mean.reshape(feature_shape),
    var=var.reshape(feature_shape),
    count=int(keep.sum()),
  )
