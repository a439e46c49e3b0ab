"""Running (population) statistics: how each training batch moves `BatchStats`.

Three rules, chosen with `running=`:

- `"ema"` (default; Flax, Keras, Haiku without debiasing, PyTorch with `momentum = 1 - decay`):
  `r <- decay * r + (1 - decay) * b`.
- `"ema_debiased"`: the same average started at zero and divided by `1 - decay**t` (Adam's bias
  correction, Haiku's `ExponentialMovingAverage`), stored already corrected. Equivalent closed form
  used here: `r <- r + w_t (b - r)` with `w_t = (1 - decay) / (1 - decay**t)`; after one step `r = b`.
- `"cumulative"`: the plain average of every batch seen (PyTorch's `momentum=None`):
  `w_t = 1 / t`.

`t` is the batch's 1-based index, `stats.count + 1`. A feature with no values in the batch (all
masked out) keeps its statistics; the count moves unless every feature was empty.
"""

import jax.numpy as jnp

from bnjax._src import types


def update(
  stats: types.BatchStats, batch_mean, batch_var, *, decay, running: str = "ema", has_rows=None
) -> types.BatchStats:
  """Moves the running statistics toward one batch's statistics.

  Args:
    stats: the running statistics (float32 mean and var of the feature shape, int32 count or None).
    batch_mean, batch_var: the batch's statistics, of the feature shape (the variance already
      corrected by m/(m-1) when an unbiased running variance is wanted).
    decay: the weight kept by the old value in `"ema"`; a float or a scalar array (schedules).
    running: one of `types.RUNNING_RULES`.
    has_rows: optional boolean, scalar or per feature; False leaves that feature's statistics as
      they are (no values in the batch). The count moves if any feature had values.

  Returns:
    The new `BatchStats`, same dtypes as `stats`.
  """
  old_mean, old_var = stats.mean, stats.var
  # A complex batch mean makes the running mean complex (as in Flax); otherwise dtypes are kept.
  batch_mean = batch_mean.astype(
    jnp.result_type(old_mean, batch_mean) if jnp.iscomplexobj(batch_mean) else old_mean.dtype
  )
  batch_var = batch_var.astype(old_var.dtype)
  if running == "ema":
    new_mean = decay * old_mean + (1.0 - decay) * batch_mean
    new_var = decay * old_var + (1.0 - decay) * batch_var
  else:
    t = (jnp.asarray(stats.count) + 1).astype(old_var.dtype)
    if running == "cumulative":
      weight = 1.0 / t
    else:
      # decay == 1 never moves an EMA; guard 0/0 there.
      weight = jnp.where(decay < 1.0, (1.0 - decay) / (1.0 - jnp.power(decay, t)), 0.0)
      weight = weight.astype(old_var.dtype)
    new_mean = old_mean + weight * (batch_mean - old_mean)
    new_var = old_var + weight * (batch_var - old_var)
  new_mean, new_var = new_mean.astype(batch_mean.dtype), new_var.astype(old_var.dtype)
  new_count = None if stats.count is None else stats.count + 1
  if has_rows is not None:
    new_mean = jnp.where(has_rows, new_mean, old_mean)
    new_var = jnp.where(has_rows, new_var, old_var)
    if stats.count is not None:
      new_count = jnp.where(jnp.any(has_rows), stats.count + 1, stats.count)
  return types.BatchStats(new_mean, new_var, new_count)
