"""Helpers shared by the layer and model tests: fast-compiling jit, test data, float32 tree comparison."""

import functools

import jax
import numpy as np

# Small programs compile several times faster without XLA's expensive CPU passes; the numbers compared
# in the tests are the same to the tolerances used.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def normal(shape, seed=0):
  """Standard normal float32 test data. Data and references are numpy: eager jax ops compile per shape."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def to_numpy(tree):
  """Every leaf as a float64 numpy array."""
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def close(a, b, tol, what=""):
  """Two trees equal in float32 to `tol` (assert_allclose's rtol/atol)."""
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32), err_msg=what, **tol),
    a,
    b,
  )
