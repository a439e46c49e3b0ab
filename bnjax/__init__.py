"""bnjax: batch normalization for JAX, as pure functions over explicit pytrees.

The functional core::

  params, stats = bnjax.init(feature_shape)
  y, stats = bnjax.batch_norm(x, params, stats, train=True)

Flax layers live in `bnjax.nn` (linen) and `bnjax.nnx`, models in `bnjax.models`, the training
step in `bnjax.training` (these need the `[flax]` extra).
"""

from bnjax._src.batch_norm import batch_norm
from bnjax._src.batch_norm import init
from bnjax._src.batch_norm import normalize
from bnjax._src.inference import fold_conv
from bnjax._src.inference import fold_dense
from bnjax._src.moments import moments
from bnjax._src.types import RUNNING_RULES
from bnjax._src.types import BatchNormParams
from bnjax._src.types import BatchStats
from bnjax._src.variants import batch_renorm
from bnjax._src.variants import precise_batch_stats

__version__ = "0.1.0"

__all__ = (
  "BatchNormParams",
  "BatchStats",
  "RUNNING_RULES",
  "batch_norm",
  "batch_renorm",
  "fold_conv",
  "fold_dense",
  "init",
  "moments",
  "normalize",
  "precise_batch_stats",
)
