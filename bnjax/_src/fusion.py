"""XLA:CPU fusion guards: where the math is written so that each full-size pass fuses.

The core's arithmetic reads x a fixed number of times only if XLA fuses each elementwise step into
the reduction or output that consumes it. On XLA:CPU three patterns would otherwise write full-size
temporaries; each helper here prevents one, and `tests/test_fusion.py` fails if the fusion is lost:

- `upcast`: one shared `convert(x)` feeding several kernels is written out (twice x's bytes for
  bfloat16); each use converts on its own behind a different number of nested barriers (identical
  barriers would be merged back into one by CSE).
- `downcast_sum`: the transpose of one shared cast is one shared conversion of the cotangent; casting
  each term apart gives each backward kernel its own fused conversion.
- `fence`: keeps a per-feature vector's own arithmetic out of the fused `sum((x - mean) ...)`, so the
  reduction reads x instead of a written-out `x - mean`.

On other backends these are no-ops in effect: barriers only constrain scheduling.
"""

import jax
import jax.numpy as jnp


def _behind_barriers(x, count: int):
  for _ in range(count):
    x = jax.lax.optimization_barrier(x)
  return x


def fence(v):
  """`v` behind one optimization barrier."""
  return jax.lax.optimization_barrier(v)


def upcast(x, dtype, use: int):
  """`x.astype(dtype)` for the `use`-th place that reads x, kept apart from the other places."""
  if x.dtype == dtype:
    return x
  return _behind_barriers(x, use).astype(dtype)


def downcast_sum(terms, dtype, shape):
  """`sum(terms)` broadcast to `shape` in `dtype`; for a narrower dtype, each term cast on its own."""
  terms = [t for t in terms if t is not None]
  if dtype == terms[0].dtype:
    total = terms[0]
    for t in terms[1:]:
      total = total + t
    return jnp.broadcast_to(total, shape)
  total = None
  for use, t in enumerate(terms):
    t = _behind_barriers(jnp.broadcast_to(t, shape).astype(dtype), use)
    total = t if total is None else total + t
  return total
