"""The XLA:CPU fusion guards of `bnjax._src.fusion` buy what they claim, and losing one fails here.

Counted on the optimised HLO (`benchmarks.hlo.anatomy`): x-sized passes over memory and full-size
temporaries of training-mode batch norm, forward and forward+backward, with every guard in place and
with each one replaced by the plain expression it guards.
"""

import functools
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from benchmarks import hlo
from bnjax._src import fusion
from bnjax._src import moments

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the guards target XLA:CPU")


def _plain_downcast_sum(terms, dtype, shape):
  terms = [t for t in terms if t is not None]
  total = terms[0]
  for t in terms[1:]:
    total = total + t
  return jnp.broadcast_to(total, shape).astype(dtype)


_UNGUARDED = {
  "fence": lambda v: v,
  "upcast": lambda x, dtype, use: x.astype(dtype),
  "downcast_sum": _plain_downcast_sum,
}


def _anatomy(dtype, shape=(2048, 128), axis_name=None):
  """Passes and temporaries of one device's program; with `axis_name`, each of 8 devices holds `shape`."""
  x = jnp.ones(shape, dtype)
  params, stats = bnjax.init(shape[-1])
  forward = functools.partial(bnjax.batch_norm, stats=stats, train=True, axis_name=axis_name)
  forward = lambda x, params, forward=forward: forward(x, params)[0]  # noqa: E731
  if axis_name is not None:
    mesh = jax.make_mesh((8,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))
    forward = jax.shard_map(forward, mesh=mesh, in_specs=(P(axis_name), P()), out_specs=P(axis_name))
    x = jax.device_put(jnp.ones((8 * shape[0],) + shape[1:], dtype), NamedSharding(mesh, P(axis_name)))

  def forward_backward(x, params, g):
    y, vjp = jax.vjp(forward, x, params)
    return y, vjp(g)

  result = {}
  for mode, fn, args in (("fwd", forward, (x, params)), ("fwd+bwd", forward_backward, (x, params, x))):
    text = jax.jit(fn).lower(*args).compile().as_text()
    anatomy = hlo.anatomy(text, math.prod(shape), x.dtype.itemsize)
    result[mode] = (anatomy.passes, len(anatomy.temporaries))
  return result


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_guarded_passes(dtype):
  # Forward: two reads for the statistics, one read and one write for y. Backward: two reads for the
  # sums, two reads (x, g) and one write for dx, plus the forward again (rematerialised).
  assert _anatomy(dtype) == {"fwd": (4.0, 0), "fwd+bwd": (10.0, 0)}


@pytest.mark.parametrize(
  "guard,dtype", [("fence", jnp.float32), ("upcast", jnp.bfloat16), ("downcast_sum", jnp.bfloat16)]
)
def test_each_guard_is_needed(monkeypatch, guard, dtype):
  monkeypatch.setattr(fusion, guard, _UNGUARDED[guard])
  unguarded = _anatomy(dtype)["fwd+bwd"]
  assert unguarded[0] > 10.0 and unguarded[1] > 0, unguarded


@pytest.mark.devices(8)
def test_one_pass_across_devices_writes_no_temporary(monkeypatch):
  """Across devices XLA:CPU runs the one-pass form, whose two sums read x apart (XLA:CPU reduces one
  array at a time): a shared `x - K` would be written out in full. (bfloat16 still writes one float32
  copy of x there: XLA:CPU does not fuse its conversion into the plain sum of `x - K`.)"""
  assert _anatomy(jnp.float32, axis_name="batch")["fwd"][1] == 0
  shifted = moments.shifted_moments
  monkeypatch.setattr(moments, "shifted_moments", lambda x, spec, separate_uses=False: shifted(x, spec))
  assert _anatomy(jnp.float32, axis_name="batch")["fwd"][1] > 0
