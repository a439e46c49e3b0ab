"""Statistics of the whole batch across devices: pmap, shard_map, sharded jit, vmap with a name.

Each path's outputs, gradients and new statistics must equal one device on the concatenated batch.
conftest.py gives 8 host CPU devices.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax

DEVICES = 8


def _data(shape=(64, 6), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(3.0, 2.0, shape).astype(np.float32)
  w = rng.normal(0.0, 1.0, shape).astype(np.float32)
  return x, w


def _params(features):
  params, stats = bnjax.init(features)
  params = params._replace(scale=params.scale * 1.5, bias=params.bias + 0.2)
  return params, stats


def _local_loss(x, w, params, stats, **kw):
  y, new_stats = bnjax.batch_norm(x, params, stats, train=True, **kw)
  return jnp.sum(jnp.sin(y) * w), (y, new_stats)


def _one_device(x, w, params, stats, mask=None):
  (_, (y, new_stats)), grads = jax.value_and_grad(_local_loss, argnums=(0, 2), has_aux=True)(
    x, w, params, stats, mask=mask
  )
  return y, new_stats, grads


def _assert_matches_one_device(got, want):
  """`(y, new_stats, dx, dparams)` of a multi-device run against one device on the whole batch."""
  (y, new_stats, dx, dparams), (y0, stats0, dx0, dparams0) = got, want
  np.testing.assert_allclose(y, y0, atol=1e-5)
  np.testing.assert_allclose(dx, dx0, atol=1e-5)
  chex.assert_trees_all_close(dparams, dparams0, atol=1e-4)
  chex.assert_trees_all_close(new_stats, stats0, atol=1e-6)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) >= DEVICES, "conftest.py must give 8 host devices"
  return jax.make_mesh((DEVICES,), ("batch",))


@pytest.mark.usefixtures("formulation")
@pytest.mark.devices(DEVICES)
def test_pmap_equals_one_device_on_the_global_batch():
  x, w = _data()
  params, stats = _params(6)
  y0, stats0, (dx0, dparams0) = _one_device(x, w, params, stats)

  def per_device(x, w):
    (_, (y, new_stats)), grads = jax.value_and_grad(_local_loss, argnums=(0, 2), has_aux=True)(
      x, w, params, stats, axis_name="batch"
    )
    return y, new_stats, grads

  y, new_stats, (dx, dparams) = jax.pmap(per_device, axis_name="batch")(
    x.reshape(DEVICES, -1, 6), w.reshape(DEVICES, -1, 6)
  )
  np.testing.assert_allclose(y.reshape(x.shape), y0, atol=1e-5)
  np.testing.assert_allclose(dx.reshape(x.shape), dx0, atol=1e-5)
  # Parameter gradients are per-device contributions: their sum is the global gradient.
  chex.assert_trees_all_close(jax.tree.map(lambda g: g.sum(0), dparams), dparams0, atol=1e-4)
  chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], new_stats), stats0, atol=1e-6)


@pytest.mark.usefixtures("formulation")
@pytest.mark.devices(DEVICES)
def test_shard_map_equals_one_device_on_the_global_batch(mesh):
  x, w = _data()
  params, stats = _params(6)
  y0, stats0, (dx0, dparams0) = _one_device(x, w, params, stats)
  sharding = NamedSharding(mesh, P("batch"))

  def per_shard(x, w, params):
    def global_loss(x, params):
      loss, aux = _local_loss(x, w, params, stats, axis_name="batch")
      return jax.lax.psum(loss, "batch"), aux

    (_, (y, new_stats)), grads = jax.value_and_grad(global_loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, new_stats, grads

  fn = jax.jit(
    jax.shard_map(
      per_shard, mesh=mesh, in_specs=(P("batch"), P("batch"), P()), out_specs=(P("batch"), P(), (P("batch"), P()))
    )
  )
  y, new_stats, (dx, dparams) = fn(jax.device_put(x, sharding), jax.device_put(w, sharding), params)
  _assert_matches_one_device((y, new_stats, dx, dparams), (y0, stats0, dx0, dparams0))


@pytest.mark.usefixtures("formulation")
@pytest.mark.devices(DEVICES)
def test_sharded_jit_needs_no_axis_name(mesh):
  x, w = _data()
  params, stats = _params(6)
  y0, stats0, (dx0, dparams0) = _one_device(x, w, params, stats)
  sharding = NamedSharding(mesh, P("batch"))
  fn = jax.jit(jax.value_and_grad(_local_loss, argnums=(0, 2), has_aux=True))
  (_, (y, new_stats)), (dx, dparams) = fn(jax.device_put(x, sharding), jax.device_put(w, sharding), params, stats)
  assert len(y.sharding.device_set) == DEVICES
  _assert_matches_one_device((y, new_stats, dx, dparams), (y0, stats0, dx0, dparams0))


@pytest.mark.usefixtures("formulation")
def test_vmap_with_axis_name_syncs_the_mapped_axis():
  x, w = _data()
  params, stats = _params(6)
  y0, stats0, (dx0, _) = _one_device(x, w, params, stats)

  def member(x, w):
    return jax.grad(_local_loss, argnums=0, has_aux=True)(x, w, params, stats, axis_name="v")

  dx, (y, new_stats) = jax.vmap(member, axis_name="v")(x.reshape(DEVICES, -1, 6), w.reshape(DEVICES, -1, 6))
  np.testing.assert_allclose(y.reshape(x.shape), y0, atol=1e-5)
  np.testing.assert_allclose(dx.reshape(x.shape), dx0, atol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], new_stats), stats0, atol=1e-6)


@pytest.mark.usefixtures("formulation")
@pytest.mark.devices(DEVICES)
def test_axis_index_groups_equal_separate_runs():
  x, w = _data()
  params, stats = _params(6)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  half = x.shape[0] // 2

  def per_device(x, w):
    (_, (y, new_stats)), dx = jax.value_and_grad(_local_loss, has_aux=True)(
      x, w, params, stats, axis_name="batch", axis_index_groups=groups
    )
    return y, new_stats, dx

  y, new_stats, dx = jax.pmap(per_device, axis_name="batch")(x.reshape(DEVICES, -1, 6), w.reshape(DEVICES, -1, 6))
  for g, rows in enumerate((slice(0, half), slice(half, None))):
    y_g, stats_g, (dx_g, _) = _one_device(x[rows], w[rows], params, stats)
    np.testing.assert_allclose(y.reshape(x.shape)[rows], y_g, atol=1e-5)
    np.testing.assert_allclose(dx.reshape(x.shape)[rows], dx_g, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda s: s[4 * g], new_stats), stats_g, atol=1e-6)


@pytest.mark.devices(DEVICES)
@pytest.mark.parametrize("form", ["rows", "per_element"])
@pytest.mark.parametrize("path", ["pmap", "shard_map"])
def test_uneven_masks_equal_dropping_values(path, form, mesh):
  x, w = _data()
  params, stats = _params(6)
  # Device d keeps d rows of its 8 (device 0 keeps none): very uneven counts.
  mask = (np.arange(64) % 8) < (np.arange(64) // 8)
  if form == "per_element":  # and feature j keeps d + j rows (capped), so every feature counts its own
    mask = (np.arange(64) % 8)[:, None] < np.minimum(np.arange(64) // 8, 7)[:, None] + np.arange(6)
  y0, stats0, (dx0, dparams0) = _one_device(x, w, params, stats, mask=mask)
  columns = mask.T if mask.ndim == 2 else [mask] * 6
  for j, keep in enumerate(columns):
    p_j, s_j = bnjax.init(1)
    p_j = p_j._replace(scale=params.scale[j : j + 1], bias=params.bias[j : j + 1])
    y_dropped, stats_dropped = bnjax.batch_norm(x[keep, j : j + 1], p_j, s_j, train=True)
    chex.assert_trees_all_close(
      jax.tree.map(lambda s: s[j : j + 1], stats0._replace(count=None)), stats_dropped._replace(count=None), atol=1e-6
    )
    np.testing.assert_allclose(y0[keep, j : j + 1], y_dropped, atol=1e-5)

  def per_device(x, w, mask, reduce_loss):
    def loss(x, params):
      value, aux = _local_loss(x, w, params, stats, axis_name="batch", mask=mask)
      return reduce_loss(value), aux

    (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, new_stats, grads

  if path == "pmap":
    y, new_stats, (dx, dparams) = jax.pmap(lambda x, w, m: per_device(x, w, m, lambda v: v), axis_name="batch")(
      x.reshape(DEVICES, -1, 6), w.reshape(DEVICES, -1, 6), mask.reshape((DEVICES, -1) + mask.shape[1:])
    )
    y, dx = y.reshape(x.shape), dx.reshape(x.shape)
    new_stats = jax.tree.map(lambda s: s[0], new_stats)
    dparams = jax.tree.map(lambda g: g.sum(0), dparams)
  else:
    sharding = NamedSharding(mesh, P("batch"))
    fn = jax.jit(
      jax.shard_map(
        lambda x, w, m: per_device(x, w, m, lambda v: jax.lax.psum(v, "batch")),
        mesh=mesh,
        in_specs=(P("batch"),) * 3,
        out_specs=(P("batch"), P(), (P("batch"), P())),
      )
    )
    y, new_stats, (dx, dparams) = fn(*(jax.device_put(a, sharding) for a in (x, w, mask)))
  _assert_matches_one_device((y, new_stats, dx, dparams), (y0, stats0, dx0, dparams0))


@pytest.mark.devices(DEVICES)
def test_per_device_statistics_must_be_asked_for_under_shard_map(mesh):
  x, _ = _data()
  params, stats = _params(6)
  sharding = NamedSharding(mesh, P("batch"))
  xs = jax.device_put(x, sharding)

  def run(axis_name):
    return jax.jit(
      jax.shard_map(
        lambda x: bnjax.batch_norm(x, params, stats, train=True, axis_name=axis_name)[0],
        mesh=mesh,
        in_specs=P("batch"),
        out_specs=P("batch"),
      )
    )(xs)

  with pytest.raises(ValueError, match=r"axis_name.*'batch'"):
    run(None)
  y = run(())
  y_first = bnjax.batch_norm(x[:8], params, stats, train=True)[0]
  np.testing.assert_allclose(np.asarray(y)[:8], y_first, atol=1e-5)


@pytest.mark.usefixtures("formulation")
@pytest.mark.devices(DEVICES)
def test_batch_of_one_per_device_counts_across_devices():
  params, stats = _params(3)
  x = np.random.default_rng(0).normal(size=(DEVICES, 1, 3)).astype(np.float32)
  y = jax.pmap(lambda x: bnjax.batch_norm(x, params, stats, train=True, axis_name="i")[0], axis_name="i")(x)
  y0 = bnjax.batch_norm(x.reshape(DEVICES, 3), params, stats, train=True)[0]
  np.testing.assert_allclose(y.reshape(DEVICES, 3), y0, atol=1e-5)
