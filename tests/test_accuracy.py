"""The exact variance in both of its forms: float32 relative error <= 1e-5 at mean 1e4, std 1.

`formulation` (conftest.py) runs each test with the form the CPU lowers (two passes) and with the GPU/TPU
one-pass form around a shift drawn from the batch, so the CPU proves the accelerators' numerics.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax._src import checks
from bnjax._src import moments as moments_lib

LOCATION = 1e4
VAR_RTOL = 1e-5
MEAN_ATOL = 2 * float(np.spacing(np.float32(LOCATION)))  # two float32 steps at 1e4 (9.8e-4 each)
EPS = float(np.finfo(np.float32).eps)
LAYOUTS = [((4096, 64), -1), ((16, 16, 16, 32), -1), ((16, 32, 16, 16), 1), ((64, 32, 48), (1, 2))]


def _data(shape, seed=0, location=LOCATION):
  return (location + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _reference(x, axis, mask=None):
  axes = tuple(a % x.ndim for a in np.atleast_1d(axis))
  reduced = tuple(a for a in range(x.ndim) if a not in axes)
  x64 = np.asarray(x, np.float64)
  if mask is None:
    return x64.mean(axis=reduced), x64.var(axis=reduced)
  w = np.broadcast_to(np.asarray(mask, np.float64).reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape)
  mean = (w * x64).sum(axis=reduced, keepdims=True) / w.sum(axis=reduced, keepdims=True)
  var = (w * (x64 - mean) ** 2).sum(axis=reduced) / w.sum(axis=reduced)
  return mean.squeeze(reduced), var


def _assert_exact(mean, var, want_mean, want_var):
  np.testing.assert_allclose(np.asarray(var, np.float64), want_var, rtol=VAR_RTOL, atol=0)
  np.testing.assert_allclose(np.asarray(mean, np.float64), want_mean, rtol=0, atol=MEAN_ATOL)


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_moments_at_mean_1e4(shape, axis):
  x = _data(shape)
  _assert_exact(*jax.jit(lambda x: bnjax.moments(x, axis=axis))(x), *_reference(x, axis))


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("shape,axis", LAYOUTS[:3])
def test_batch_norm_statistics_at_mean_1e4(shape, axis):
  x = _data(shape)
  features = shape[axis]
  params, stats = bnjax.init(features)
  y, new = jax.jit(lambda x: bnjax.batch_norm(x, params, stats, train=True, axis=axis, decay=0.0))(x)
  _assert_exact(new.mean, new.var, *_reference(x, axis))
  reduced = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  np.testing.assert_allclose(np.asarray(y, np.float64).std(axis=reduced), 1.0, rtol=1e-4)


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("form", ["rows", "per_element"])
def test_masked_statistics_at_mean_1e4(form):
  x = _data((2048, 16))
  rng = np.random.default_rng(1)
  mask = rng.random((2048,)) < 0.6 if form == "rows" else rng.random((2048, 16)) < 0.6
  params, stats = bnjax.init(16)
  _, new = jax.jit(lambda x, m: bnjax.batch_norm(x, params, stats, train=True, decay=0.0, mask=m))(x, mask)
  _assert_exact(new.mean, new.var, *_reference(x, -1, mask))


@pytest.mark.usefixtures("formulation")
def test_ghost_batch_statistics_at_mean_1e4():
  x = _data((1024, 16))
  params, stats = bnjax.init(16)
  _, new = jax.jit(lambda x: bnjax.batch_norm(x, params, stats, train=True, decay=0.0, virtual_batch_size=256))(x)
  groups = np.asarray(x, np.float64).reshape(4, 256, 16)
  _assert_exact(new.mean, new.var, groups.mean(axis=1).mean(axis=0), groups.var(axis=1).mean(axis=0))


@pytest.mark.devices(8)
@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("path", ["shard_map", "shard_map masked", "sharded jit explicit", "sharded jit auto"])
def test_statistics_across_devices_at_mean_1e4(path):
  x = _data((8 * 256, 16))
  mask = np.random.default_rng(1).random(8 * 256) < (0.6 if path.endswith("masked") else 2.0)
  params, stats = bnjax.init(16)

  def step(x, m, name=None):
    return bnjax.batch_norm(x, params, stats, train=True, decay=0.0, axis_name=name, mask=m)[1]

  if path.startswith("shard_map"):
    mesh = jax.make_mesh((8,), ("batch",))
    run = jax.jit(jax.shard_map(lambda x, m: step(x, m, "batch"), mesh=mesh, in_specs=P("batch"), out_specs=P()))
  else:
    kind = AxisType.Explicit if path.endswith("explicit") else AxisType.Auto
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(kind,))
    run = jax.jit(lambda x, m: step(x, None))
  sharding = NamedSharding(mesh, P("batch"))
  new = run(jax.device_put(x, sharding), jax.device_put(mask, sharding))
  _assert_exact(new.mean, new.var, *_reference(x, -1, mask))


@pytest.mark.parametrize("z", [3.0, 30.0, 300.0])
def test_one_pass_error_grows_with_the_shifts_distance_in_stds_not_the_mean(z):
  """The first row lies z stds from the mean: the error is bounded by (1 + z^2) roundings, at any location."""
  for location in (0.0, LOCATION):
    x = _data((4096, 8), location=location)
    x[0] = location + z
    spec, _ = checks.spec(x, axis=-1)
    n, _, _, m2 = jax.jit(lambda x: moments_lib.shifted_moments(x, spec))(x)
    _, want_var = _reference(x, -1)
    error = np.max(np.abs(np.asarray(m2 / n, np.float64)[0] / want_var - 1))
    assert error <= 16 * (1 + z * z) * EPS, (location, error)
    two_n, _, _, two_m2 = jax.jit(lambda x: moments_lib.two_pass_moments(x, None, spec))(x)
    assert np.max(np.abs(np.asarray(two_m2 / two_n, np.float64)[0] / want_var - 1)) <= VAR_RTOL


def test_formulation_fixture_swaps_the_form_the_cpu_runs(formulation):
  """The fixture's one-pass form is really what the CPU then runs (its shift is a slice of x)."""
  jaxpr = jax.make_jaxpr(lambda x: bnjax.moments(x))(jnp.ones((8, 3)))
  one_pass = formulation == "one-pass" or jax.default_backend() != "cpu"
  assert any(e.primitive.name == "slice" for e in jaxpr.eqns) == one_pass


def _primitives(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _primitives(sub)


@pytest.mark.parametrize("transform", ["jit", "grad", "vmap", "vmap of grad"])
def test_no_branch_on_data(transform):
  """The form is chosen when tracing: no `cond` for vmap to turn into both branches, nothing that waits
  on the host."""
  params, stats = bnjax.init(4)

  def loss(x):
    return jnp.sum(jnp.sin(bnjax.batch_norm(x, params, stats, train=True)[0]))

  fn = {"jit": loss, "grad": jax.grad(loss), "vmap": jax.vmap(loss), "vmap of grad": jax.vmap(jax.grad(loss))}
  x = jnp.ones((3, 16, 4)) if transform.startswith("vmap") else jnp.ones((16, 4))
  primitives = set(_primitives(jax.make_jaxpr(fn[transform])(x).jaxpr))
  assert "reduce_sum" in primitives and not primitives & {"cond", "while", "platform_index"}
  assert "conditional" not in jax.jit(fn[transform]).lower(x).compile().as_text()
