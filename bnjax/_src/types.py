"""The pytrees of the functional core.

Their fields map one to one onto `flax.linen.BatchNorm`'s variables: `scale` and `bias` are
`params/scale` and `params/bias`; `mean` and `var` are `batch_stats/mean` and `batch_stats/var`.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax

Array = jax.Array
Axis = int | Sequence[int]
AxisName = str | Sequence[str] | None

RUNNING_RULES = ("ema", "ema_debiased", "cumulative")
"""The running-statistics rules of `batch_norm(running=...)` (see `bnjax._src.running`)."""


class BatchNormParams(NamedTuple):
  """The learned affine transform `y = scale * x_hat + bias`, one value per feature.

  Attributes:
    scale: gamma, of the feature shape; None when the layer has no scale (gamma = 1).
    bias: beta, of the feature shape; None when the layer has no bias (beta = 0).
  """

  scale: Array | None
  bias: Array | None


class BatchStats(NamedTuple):
  """Running statistics, used instead of the batch's in inference mode.

  Attributes:
    mean: running mean, float32, of the feature shape.
    var: running variance, float32, of the feature shape.
    count: int32 scalar, how many training batches have updated the statistics. Needed by
      `running="ema_debiased"` and `running="cumulative"`; may be None for plain `running="ema"`
      (as in `flax.linen.BatchNorm`, whose `batch_stats` hold only `mean` and `var`).
  """

  mean: Array
  var: Array
  count: Array | None = None
