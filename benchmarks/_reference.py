"""A float64 NumPy batch norm (forward, backward, running statistics) that every benchmarked output is checked
against, and the comparison rule.

Layout: features on the last axis, every other axis reduced (`(N, D)` and `(N, H, W, C)`). With m = the number of
reduced elements per feature (Ioffe & Szegedy 2015, Algorithm 1 and its gradient):

  mu = mean(x),  var = mean((x - mu)^2),  xhat = (x - mu) / sqrt(var + eps),  y = scale * xhat + bias
  dbias = sum(g),  dscale = sum(g * xhat),  dx = scale / (m * sqrt(var + eps)) * (m * g - dbias - xhat * dscale)

Running statistics follow each library's documented rule, given as a `RunningRule`.
"""

from collections.abc import Callable
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np


class Reference(NamedTuple):
  y: np.ndarray  # x's shape
  batch_mean: np.ndarray  # (features,)
  batch_var: np.ndarray  # (features,), biased
  count: int  # m, reduced elements per feature
  dx: np.ndarray  # x's shape
  dscale: np.ndarray  # (features,)
  dbias: np.ndarray  # (features,)


def batch_norm_reference(
  x: np.ndarray, scale: np.ndarray, bias: np.ndarray, cotangent: np.ndarray, *, epsilon: float
) -> Reference:
  """Training-mode batch norm of feature-last `x` and its VJP for `cotangent`, all in float64."""
  x = np.asarray(x, np.float64)
  g = np.asarray(cotangent, np.float64)
  scale = np.asarray(scale, np.float64)
  bias = np.asarray(bias, np.float64)
  axes = tuple(range(x.ndim - 1))
  count = int(np.prod([x.shape[a] for a in axes]))
  mean = x.mean(axis=axes)
  centered = x - mean
  var = np.mean(centered * centered, axis=axes)
  inv_std = 1.0 / np.sqrt(var + epsilon)
  xhat = centered * inv_std
  dbias = g.sum(axis=axes)
  dscale = (g * xhat).sum(axis=axes)
  dx = (scale * inv_std / count) * (count * g - dbias - xhat * dscale)
  return Reference(
    y=xhat * scale + bias, batch_mean=mean, batch_var=var, count=count, dx=dx, dscale=dscale, dbias=dbias
  )


# (batch mean, biased batch var, count) -> (new running mean, new running var), in float64.
RunningRule = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def ema_rule(mean0: np.ndarray, var0: np.ndarray, decay: float, *, unbiased_var: bool = False) -> RunningRule:
  """running = decay * running + (1 - decay) * batch (Flax `momentum`); PyTorch stores the unbiased variance."""

  def rule(mean, var, count):
    if unbiased_var:
      var = var * count / (count - 1)
    return (decay * np.float64(mean0) + (1 - decay) * mean, decay * np.float64(var0) + (1 - decay) * var)

  return rule


def debiased_ema_rule(hidden_mean0: np.ndarray, hidden_var0: np.ndarray, counter0: int, decay: float) -> RunningRule:
  """Haiku's zero-debiased EMA: hidden <- decay * hidden + (1 - decay) * batch; average = hidden / (1 - decay^t)."""

  def rule(mean, var, count):
    del count
    steps = counter0 + 1
    correction = 1.0 - decay**steps
    return (
      (decay * np.float64(hidden_mean0) + (1 - decay) * mean) / correction,
      (decay * np.float64(hidden_var0) + (1 - decay) * var) / correction,
    )

  return rule


# Largest error allowed, relative to the largest magnitude of the reference array. float32 leaves room for
# float32 sums over 65536 rows; bfloat16 for one rounding of the output (2^-8) plus peers that compute the
# statistics and the backward in bfloat16 itself.
TOLERANCE = {"float32": 2e-4, "bfloat16": 4e-2}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
  """max|got - want| / max|want| (inf if shapes differ or anything is not finite)."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.shape != want.shape:
    return float("inf")
  if not np.all(np.isfinite(got)):
    return float("inf")
  scale = max(float(np.max(np.abs(want))), 1e-12)
  return float(np.max(np.abs(got - want))) / scale


def compare(
  outputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], tolerance: float
) -> tuple[bool, dict[str, float]]:
  """Checks every expected array; an expected name missing from `outputs` is a failure (error inf)."""
  errors = {
    name: (relative_error(outputs[name], want) if name in outputs else float("inf")) for name, want in expected.items()
  }
  return all(error <= tolerance for error in errors.values()), errors
