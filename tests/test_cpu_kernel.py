"""bnjax's XLA:CPU kernels (`implementation="cpu_kernel"`) against float64 NumPy and the default path.

Checks that:
- the FFI kernels (`moments`, `backward_sums`, the fused `backward`) match float64 NumPy for float32 and bfloat16
  views `(A, C, B)`, stay exact when the mean dwarfs the spread (where the one-pass
  `E[x^2] - E[x]^2` fails), and give bitwise-identical results from call to call;
- `batch_norm(..., implementation="cpu_kernel")` equals the default path (y, new statistics,
  gradients of x and params through a loss that also uses the new statistics) over layouts,
  dtypes and absent scale/bias; under shard_map, pmap, vmap with and without `axis_name`; under a
  sharded jit, where each device reduces its own shard (no all-gather in the compiled program); in
  inference mode;
- the kernels are in the compiled program when they apply, and absent (with the same results) for
  the cases they do not cover;
- the errors: a bad `implementation`, forward-mode autodiff of the custom VJP;
- in subprocesses: without a compiler, `build_cpu_kernels` raises and `batch_norm` warns once and
  falls back; the build is cached under `$BNJAX_CACHE_DIR` and not redone.
"""
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import bnjax
from bnjax._src import cpu_kernel

if jax.default_backend() != "cpu":
  pytest.skip(f"bnjax's CPU kernels run on the CPU backend only, not {jax.default_backend()}",
              allow_module_level=True)
_UNAVAILABLE = cpu_kernel.unavailable_reason()
if _UNAVAILABLE is not None:
  pytest.skip(f"bnjax's CPU kernels are unavailable: {_UNAVAILABLE}", allow_module_level=True)

DEVICES = 8
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
# (A, C, B): features last (B == 1) and NCHW-like (B > 1). The last two exceed 8 MiB even in
# bfloat16, so the rows are split into 15 or 16 partitions, A not a multiple of their count.
VIEWS = [(1, 3, 1), (7, 5, 1), (300, 33, 1), (4100, 17, 1), (5, 4, 9), (33, 3, 50),
         (100003, 40, 1), (2003, 16, 129)]
# (shape, axis) for batch_norm: (N, D), NHWC, NCHW, two adjacent feature axes, (N, T, D).
LAYOUTS = [((64, 32), -1), ((4, 5, 6, 8), -1), ((4, 8, 5, 6), 1), ((4, 6, 5, 7), (1, 2)),
           ((8, 3, 16), -1)]


def _as_f64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _kernel_inputs(view, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(3.0, 2.0, view), dtype)
  g = jnp.asarray(rng.normal(0.0, 1.0, view), dtype)
  # Not x's mean: the kernel must use the `mean` it is given.
  mu = jnp.asarray(_as_f64(x).mean((0, 2)) + rng.normal(0.0, 0.5, view[1]), jnp.float32)
  return x, g, mu


@DTYPES
@pytest.mark.parametrize("view", VIEWS, ids=str)
def test_kernels_match_float64_numpy(view, dtype):
  x, g, mu = _kernel_inputs(view, dtype)
  x64, g64, mu64 = _as_f64(x), _as_f64(g), _as_f64(mu)[None, :, None]
  mean, m2 = jax.jit(cpu_kernel.moments)(x)
  sum_g, sum_gc = jax.jit(cpu_kernel.backward_sums)(x, g, mu)
  for out in (mean, m2, sum_g, sum_gc):
    assert out.dtype == jnp.float32 and out.shape == (view[1],)
  want_mean = x64.mean((0, 2))
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m2, ((x64 - want_mean[None, :, None]) ** 2).sum((0, 2)), rtol=1e-5)
  # Sums with cancellation: the error is relative to the sum of the terms' magnitudes.
  terms_gc = g64 * (x64 - mu64)
  np.testing.assert_allclose(sum_g, g64.sum((0, 2)), atol=1e-5 * np.abs(g64).sum((0, 2)).max())
  np.testing.assert_allclose(sum_gc, terms_gc.sum((0, 2)),
                             atol=1e-5 * np.abs(terms_gc).sum((0, 2)).max())


@DTYPES
@pytest.mark.parametrize("view", VIEWS, ids=str)
def test_fused_backward_matches_float64_numpy(view, dtype):
  x, g, mu = _kernel_inputs(view, dtype)
  rng = np.random.default_rng(1)
  gain, mean_coef, proj_coef, offset0, slope0 = (
      jnp.asarray(rng.normal(0.0, 1.0, view[1]), jnp.float32) for _ in range(5))
  dx, sum_g, sum_gc = jax.jit(cpu_kernel.backward)(x, g, mu, gain, mean_coef, proj_coef, offset0,
                                                   slope0)
  assert dx.dtype == x.dtype and dx.shape == x.shape
  x64, g64 = _as_f64(x), _as_f64(g)
  col = lambda v: _as_f64(v)[None, :, None]
  want_g, want_gc = g64.sum((0, 2)), (g64 * (x64 - col(mu))).sum((0, 2))
  chex.assert_trees_all_close((sum_g, sum_gc), (want_g, want_gc), rtol=1e-4,
                              atol=1e-4 * np.abs(g64 * x64).sum((0, 2)).max())
  offset = col(offset0) - col(mean_coef) * want_g[None, :, None]
  slope = col(slope0) - col(proj_coef) * want_gc[None, :, None]
  want_dx = col(gain) * g64 + offset + slope * (x64 - col(mu))
  # float32: a few ulps of the largest term; bfloat16: dx is rounded to 8 bits like XLA's convert.
  tol = 1e-4 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(_as_f64(dx), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max())


@pytest.mark.parametrize("view", [(4100, 17, 1), (33, 3, 50), (100003, 40, 1)], ids=str)
def test_moments_stay_exact_when_the_mean_dwarfs_the_spread(view):
  x = (1e4 + np.random.default_rng(1).normal(0.0, 1.0, view)).astype(np.float32)
  x64 = x.astype(np.float64)
  want_var = x64.var((0, 2))
  mean, m2 = cpu_kernel.moments(jnp.asarray(x))
  np.testing.assert_allclose(mean, x64.mean((0, 2)), rtol=1e-6)  # a few float32 ulps
  np.testing.assert_allclose(m2 / (view[0] * view[2]), want_var, rtol=1e-3)
  # The one-pass float32 formula on the same data is far off: the test can tell the two apart.
  naive = (x * x).mean((0, 2), dtype=np.float32) - x.mean((0, 2), dtype=np.float32) ** 2
  assert np.max(np.abs(naive - want_var) / want_var) > 0.5


def test_moments_stay_exact_for_long_runs_when_the_mean_dwarfs_the_spread():
  view = (1, 3, 1_000_000)  # NCHW, one 1000 x 1000 image: a single run of 1e6 values per feature
  x = (1e4 + np.random.default_rng(2).normal(0.0, 1.0, view)).astype(np.float32)
  _, m2 = cpu_kernel.moments(jnp.asarray(x))
  np.testing.assert_allclose(m2 / view[2], x.astype(np.float64).var((0, 2)), rtol=1e-3)


@DTYPES
@pytest.mark.parametrize("view", [(100003, 40, 1), (2003, 16, 129)], ids=str)
def test_kernels_are_bitwise_reproducible(view, dtype):
  x, g, mu = _kernel_inputs(view, dtype)
  fn = jax.jit(lambda x, g, mu: (cpu_kernel.moments(x), cpu_kernel.backward_sums(x, g, mu)))
  bits = lambda out: jax.tree.map(lambda a: np.asarray(a).view(np.uint32), out)
  first = bits(fn(x, g, mu))
  for _ in range(4):
    chex.assert_trees_all_equal(bits(fn(x, g, mu)), first)
  # Concurrent calls compete for the thread pool, so parts finish in varying order.
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for out in pool.map(lambda _: bits(fn(x, g, mu)), range(8)):
      chex.assert_trees_all_equal(out, first)


def _problem(shape, axis, dtype=jnp.float32, use_scale=True, use_bias=True, seed=0):
  """`(x, params, stats, w, stat_w)`: non-trivial params and running statistics, loss weights."""
  rng = np.random.default_rng(seed)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  feature_shape = tuple(shape[a] for a in axes)
  x = jnp.asarray(rng.normal(3.0, 2.0, shape), dtype)
  w = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
  params, stats = bnjax.init(feature_shape, use_scale=use_scale, use_bias=use_bias)
  if use_scale:
    params = params._replace(scale=jnp.asarray(rng.uniform(0.5, 1.5, feature_shape), jnp.float32))
  if use_bias:
    params = params._replace(bias=jnp.asarray(rng.normal(0.0, 1.0, feature_shape), jnp.float32))
  stats = stats._replace(mean=jnp.asarray(rng.normal(0.0, 1.0, feature_shape), jnp.float32),
                         var=jnp.asarray(rng.uniform(0.5, 2.0, feature_shape), jnp.float32))
  # Scaled by the rows per feature so the statistics' cotangents weigh as much as y's in dx.
  rows = np.prod(shape) // np.prod(feature_shape)
  stat_w = jnp.asarray(rng.normal(0.0, 1.0, (2,) + feature_shape) * rows, jnp.float32)
  return x, params, stats, w, stat_w


def _loss(x, params, stats, w, stat_w, stat_scale=1.0, **kw):
  y, new_stats = bnjax.batch_norm(x, params, stats, train=True, decay=0.5, **kw)
  stat_term = jnp.sum(new_stats.mean * stat_w[0]) + jnp.sum(new_stats.var * stat_w[1])
  return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w) + stat_scale * stat_term, (y, new_stats)


def _outputs(x, params, stats, w, stat_w, **kw):
  """(y, new_stats, dx, dparams) of `_loss`, jitted."""
  grad_fn = jax.value_and_grad(lambda x, p: _loss(x, p, stats, w, stat_w, **kw), argnums=(0, 1),
                               has_aux=True)
  (_, (y, new_stats)), (dx, dparams) = jax.jit(grad_fn)(x, params)
  return y, new_stats, dx, dparams


def _assert_close(got, want, dtype=jnp.float32):
  tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  as_f32 = lambda t: jax.tree.map(lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32)), t)
  chex.assert_trees_all_close(as_f32(got), as_f32(want), **tol)


@DTYPES
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=str)
def test_kernel_path_equals_default_path(shape, axis, dtype):
  x, params, stats, w, stat_w = _problem(shape, axis, dtype)
  got = _outputs(x, params, stats, w, stat_w, axis=axis, implementation="cpu_kernel")
  want = _outputs(x, params, stats, w, stat_w, axis=axis)
  assert got[0].dtype == x.dtype and got[2].dtype == x.dtype
  _assert_close(got, want, dtype)


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False), (False, False)])
def test_kernel_path_without_scale_or_bias(use_scale, use_bias):
  x, params, stats, w, stat_w = _problem((4, 8, 5, 6), 1, use_scale=use_scale, use_bias=use_bias)
  got = _outputs(x, params, stats, w, stat_w, axis=1, implementation="cpu_kernel")
  _assert_close(got, _outputs(x, params, stats, w, stat_w, axis=1))
  assert (got[3].scale is None) != use_scale and (got[3].bias is None) != use_bias


def _lowered(x, params, stats, w, stat_w, **kw):
  """The StableHLO text of the forward pass and of the gradient."""
  forward = jax.jit(lambda x, p: _loss(x, p, stats, w, stat_w, **kw)).lower(x, params).as_text()
  grad = jax.jit(jax.grad(lambda x, p: _loss(x, p, stats, w, stat_w, **kw)[0], argnums=(0, 1)))
  return forward, grad.lower(x, params).as_text()


@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=str)
def test_kernels_are_in_the_compiled_program(shape, axis):
  args = _problem(shape, axis)
  forward, grad = _lowered(*args, axis=axis, implementation="cpu_kernel")
  assert "bnjax_moments" in forward and "bnjax_backward" not in forward
  assert "bnjax_moments" in grad and "@bnjax_backward(" in grad
  for text in _lowered(*args, axis=axis, implementation="xla"):
    assert "bnjax_moments" not in text and "bnjax_backward" not in text


FALLBACKS = {
    "mask": ((16, 6), -1, jnp.float32, dict(mask=np.arange(16) % 3 != 0)),
    "virtual_batch_size": ((16, 6), -1, jnp.float32, dict(virtual_batch_size=4)),
    "float16": ((16, 6), -1, jnp.float16, {}),
    "bfloat16": ((16, 6), -1, jnp.bfloat16, {}),  # the kernels take it, batch_norm keeps it in XLA
    "non_adjacent_axes": ((4, 5, 6), (0, 2), jnp.float32, {}),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_uncovered_cases_fall_back_to_the_default_path(case):
  shape, axis, dtype, kw = FALLBACKS[case]
  args = _problem(shape, axis, dtype)
  for text in _lowered(*args, axis=axis, implementation="cpu_kernel", **kw):
    assert "bnjax_moments" not in text and "bnjax_backward" not in text
  got = _outputs(*args, axis=axis, implementation="cpu_kernel", **kw)
  chex.assert_trees_all_close(got, _outputs(*args, axis=axis, **kw), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) >= DEVICES, "conftest.py must give 8 host devices"
  return jax.make_mesh((DEVICES,), ("batch",))


def _shard_map_outputs(mesh, x, params, stats, w, stat_w, axis, implementation):
  """(loss per device, y, new_stats, dx, dparams), the gradient taken inside shard_map.

  The statistic term is divided by the device count, so the sum of the per-device losses is the
  one-device loss on the whole batch.
  """
  def per_shard(x, w, params):
    (loss, (y, new_stats)), (dx, dparams) = jax.value_and_grad(
        lambda x, p: _loss(x, p, stats, w, stat_w, 1.0 / DEVICES, axis=axis, axis_name="batch",
                           implementation=implementation), argnums=(0, 1), has_aux=True)(x, params)
    return loss[None], y, new_stats, dx, dparams

  fn = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("batch"), P("batch"), P()),
                             out_specs=(P("batch"), P("batch"), P(), P("batch"), P())))
  sharding = NamedSharding(mesh, P("batch"))
  return fn(jax.device_put(x, sharding), jax.device_put(w, sharding), params)


@pytest.mark.devices(8)
@pytest.mark.parametrize("shape,axis", [((64, 6), -1), ((16, 4, 3, 5), 1)], ids=str)
def test_shard_map_kernel_path_equals_default_and_one_device(shape, axis, mesh):
  args = _problem(shape, axis)
  loss, *got = _shard_map_outputs(mesh, *args, axis, "cpu_kernel")
  want_loss, *want = _shard_map_outputs(mesh, *args, axis, None)
  _assert_close(loss, want_loss)
  _assert_close(got, want)
  # The whole batch on one device: y, statistics, dx and (the loss being the same) param grads.
  one = _outputs(*args, axis=axis)
  chex.assert_trees_all_close(tuple(got), one, atol=1e-5, rtol=1e-5)


@pytest.mark.devices(8)
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("shape,axis", [((64, 6), -1), ((16, 4, 3, 5), 1)], ids=str)
def test_sharded_jit_reduces_each_shard_without_gathering(shape, axis, axis_type):
  x, params, stats, w, stat_w = _problem(shape, axis)
  mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(axis_type,))
  sharding = NamedSharding(mesh, P("batch"))
  xs, ws = jax.device_put(x, sharding), jax.device_put(w, sharding)

  def run(implementation):
    grad_fn = jax.value_and_grad(
        lambda x, w, p: _loss(x, p, stats, w, stat_w, axis=axis, implementation=implementation),
        argnums=(0, 2), has_aux=True)
    return jax.jit(grad_fn)

  kernel = run("cpu_kernel")
  compiled = kernel.lower(xs, ws, params).compile().as_text()
  # Partitioned, not gathered: each device's kernels read only its own rows.
  assert "bnjax_moments" in compiled and "bnjax_backward_sums" in compiled
  assert "all-gather" not in compiled
  (_, (y, new_stats)), (dx, dparams) = kernel(xs, ws, params)
  assert y.sharding.spec[0] == "batch" and dx.sharding.spec[0] == "batch"
  _assert_close((y, new_stats, dx, dparams), _outputs(x, params, stats, w, stat_w, axis=axis))


@pytest.mark.devices(8)
@pytest.mark.parametrize("mapper", ["pmap", "vmap"])
def test_mapped_axis_name_kernel_path_equals_default(mapper):
  x, params, stats, w, stat_w = _problem((64, 6), -1)

  def run(implementation):
    def member(x, w):
      return _outputs(x, params, stats, w, stat_w, axis_name="i", implementation=implementation)
    transform = jax.pmap if mapper == "pmap" else jax.vmap
    return transform(member, axis_name="i")(x.reshape(DEVICES, -1, 6), w.reshape(DEVICES, -1, 6))

  got, want = run("cpu_kernel"), run(None)
  _assert_close(got, want)
  # Each device normalizes with the statistics of the whole batch.
  y_one = bnjax.batch_norm(x, params, stats, train=True, decay=0.5)[0]
  np.testing.assert_allclose(got[0].reshape(x.shape), y_one, atol=1e-5, rtol=1e-5)


def test_plain_vmap_over_an_ensemble_equals_default():
  members = [_problem((32, 6), -1, seed=s) for s in range(3)]
  x, params, stats, w, stat_w = jax.tree.map(lambda *a: jnp.stack(a), *members)

  def run(implementation):
    return jax.vmap(lambda *a: _outputs(*a, implementation=implementation))(
        x, params, stats, w, stat_w)

  got = run("cpu_kernel")
  _assert_close(got, run(None))
  # Each member on its own: no statistics shared across the ensemble.
  for m, member in enumerate(members):
    _assert_close(jax.tree.map(lambda a: a[m], got), _outputs(*member))


def test_inference_equals_default():
  x, params, stats, _, _ = _problem((4, 8, 5, 6), 1)
  fn = lambda x, impl: bnjax.batch_norm(x, params, stats, train=False, axis=1, implementation=impl)
  y, new_stats = fn(x, "cpu_kernel")
  chex.assert_trees_all_equal((y, new_stats), fn(x, None))
  chex.assert_trees_all_equal(new_stats, stats)


def test_errors():
  x, params, stats, _, _ = _problem((8, 4), -1)
  with pytest.raises(ValueError, match="implementation"):
    bnjax.batch_norm(x, params, stats, train=True, implementation="cuda")
  f = lambda x: bnjax.batch_norm(x, params, stats, train=True, implementation="cpu_kernel")[0]
  with pytest.raises(TypeError, match="custom_vjp|forward-mode"):
    jax.jvp(f, (x,), (jnp.ones_like(x),))


def _python(code, cache_dir, **env):
  """Runs `code` in a fresh interpreter with BNJAX_CACHE_DIR=cache_dir; returns its stdout."""
  full_env = {k: v for k, v in os.environ.items() if k != "CXX"}
  full_env.update(JAX_PLATFORMS="cpu", BNJAX_CACHE_DIR=str(cache_dir), **env)
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_without_a_compiler_build_raises_and_batch_norm_warns_once_and_falls_back(tmp_path):
  out = _python("""
      import warnings
      import numpy as np
      import bnjax
      from bnjax._src.cpu_kernel import KernelUnavailableError
      try:
        bnjax.build_cpu_kernels()
        raise AssertionError("build_cpu_kernels() did not raise")
      except KernelUnavailableError as e:
        assert "bnjax-no-such-compiler" in str(e), str(e)
      x = np.random.default_rng(0).normal(3.0, 2.0, (32, 6)).astype(np.float32)
      params, stats = bnjax.init(6)
      want = bnjax.batch_norm(x, params, stats, train=True)
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [bnjax.batch_norm(x, params, stats, train=True, implementation="cpu_kernel")
               for _ in range(2)]
      messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
      assert len(messages) == 1 and "falls back" in messages[0], messages
      for y, new_stats in got:
        np.testing.assert_array_equal(y, want[0])
        np.testing.assert_array_equal(new_stats.var, want[1].var)
      print("ok")
      """, tmp_path / "cache", CXX="bnjax-no-such-compiler")
  assert out.strip() == "ok"
  assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_build_is_cached(tmp_path):
  cache = tmp_path / "cache"
  code = "import bnjax; print(bnjax.build_cpu_kernels()); print(bnjax.build_cpu_kernels())"
  first, again = _python(code, cache).split()
  path = pathlib.Path(first)
  assert again == first and path.parent == cache
  assert [p.name for p in cache.iterdir()] == [path.name]
  assert path.name.startswith("libbnjax_cpu_") and path.suffix == ".so"
  before = path.stat()
  # A new process finds the cached library and does not rebuild it.
  assert _python(code, cache).split() == [first, first]
  after = path.stat()
  assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
  assert [p.name for p in cache.iterdir()] == [path.name]
