"""The functional core against a float64 NumPy reference, and its transformations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import bnjax

# (shape, axis): (N, D), (N, T, D), NHWC, NCHW, tuple and negative axes.
LAYOUTS = [
  ((32, 6), -1),
  ((8, 5, 6), -1),
  ((4, 5, 3, 6), -1),
  ((4, 6, 5, 3), 1),
  ((4, 5, 3, 6), (1, 3)),
  ((6, 4, 5), (-2, -1)),
]


def _inputs(shape, axis, seed=0, loc=3.0, scale=2.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(loc, scale, shape).astype(np.float32)
  dy = rng.normal(0, 1, shape).astype(np.float32)
  axes = (axis,) if isinstance(axis, int) else axis
  feature_shape = tuple(shape[a] for a in axes)
  gamma = rng.uniform(0.5, 1.5, feature_shape).astype(np.float32)
  beta = rng.normal(0, 1, feature_shape).astype(np.float32)
  return x, dy, gamma, beta, axes


def _vjp(x, params, stats, dy, **kw):
  def f(x, params):
    return bnjax.batch_norm(x, params, stats, train=True, **kw)

  (y, new_stats), pullback = jax.vjp(f, x, params)
  zero_stats = jax.tree.map(jnp.zeros_like, new_stats)
  zero_stats = zero_stats._replace(count=None) if new_stats.count is None else zero_stats
  dx, dparams = pullback(
    (
      dy,
      jax.tree.map(
        lambda s: np.zeros(s.shape, jax.dtypes.float0) if jnp.issubdtype(s.dtype, jnp.integer) else s, zero_stats
      ),
    )
  )
  return y, new_stats, dx, dparams


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_train_matches_numpy_reference(shape, axis):
  x, dy, gamma, beta, axes = _inputs(shape, axis)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(gamma.shape)
  y, new_stats, dx, dparams = jax.jit(_vjp, static_argnames="axis")(x, params, stats, dy, axis=axis)
  want = ref.forward_backward(x, gamma, beta, dy, axes)
  np.testing.assert_allclose(y, want["y"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dx, want["dx"], atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(dparams.scale, want["dscale"], atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dparams.bias, want["dbias"], atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(new_stats.mean, 0.01 * want["mean"], atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(new_stats.var, 0.99 + 0.01 * want["var"], atol=1e-6, rtol=1e-5)
  assert y.dtype == x.dtype and y.shape == x.shape


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("unbiased", [False, True])
def test_running_statistics_over_five_steps_then_eval(shape, axis, unbiased):
  decay, eps = 0.9, 1e-3
  _, _, gamma, beta, axes = _inputs(shape, axis)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(gamma.shape)
  step = jax.jit(
    lambda x, s: bnjax.batch_norm(
      x, params, s, train=True, axis=axis, decay=decay, epsilon=eps, unbiased_running_var=unbiased
    )
  )
  run_mean = np.zeros(gamma.shape)
  run_var = np.ones(gamma.shape)
  for i in range(5):
    x, _, _, _, _ = _inputs(shape, axis, seed=10 + i, loc=i, scale=1 + i)
    _, stats = step(x, stats)
    want = ref.forward_backward(x, gamma, beta, np.zeros_like(x), axes, eps)
    m = want["count"]
    batch_var = want["var"] * (m / (m - 1) if unbiased else 1.0)
    run_mean = decay * run_mean + (1 - decay) * want["mean"]
    run_var = decay * run_var + (1 - decay) * batch_var
  np.testing.assert_allclose(stats.mean, run_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.var, run_var, rtol=1e-5, atol=1e-5)
  assert int(stats.count) == 5

  x, _, _, _, _ = _inputs(shape, axis, seed=99)
  y, same = bnjax.batch_norm(x, params, stats, train=False, axis=axis, epsilon=eps)
  bshape = [1] * x.ndim
  for a in axes:
    bshape[a] = x.shape[a]
  r = lambda v: np.asarray(v, np.float64).reshape(bshape)
  want_y = r(gamma) * (x - r(run_mean)) / np.sqrt(r(run_var) + eps) + r(beta)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  assert same is stats


def test_masked_rows_equal_dropping_them():
  x, dy, gamma, beta, axes = _inputs((24, 5), -1)
  mask = np.random.default_rng(1).random(24) < 0.6
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(5)
  y, new_stats, dx, dparams = _vjp(x, params, stats, dy, mask=mask)
  want = ref.forward_backward(x, gamma, beta, dy, axes, mask=mask)
  np.testing.assert_allclose(y, want["y"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dx, want["dx"], atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(dparams.scale, want["dscale"], atol=1e-4)
  np.testing.assert_allclose(new_stats.mean, 0.01 * want["mean"], atol=1e-6)
  # Statistics equal those of the batch with the false rows dropped.
  y_dropped, stats_dropped = bnjax.batch_norm(x[mask], params, stats, train=True)
  np.testing.assert_allclose(y[mask], y_dropped, atol=1e-5)
  chex.assert_trees_all_close(new_stats, stats_dropped, atol=1e-6)


def test_mask_all_false_leaves_running_statistics():
  x, _, _, _, _ = _inputs((8, 3), -1)
  params, stats = bnjax.init(3)
  stats = stats._replace(mean=stats.mean + 2.0)
  params = params._replace(bias=jnp.arange(3.0))
  for mask in (np.zeros(8, bool), np.zeros((8, 3), bool)):
    y, new_stats = bnjax.batch_norm(x, params, stats, train=True, mask=mask)
    chex.assert_trees_all_close(new_stats, stats)
    np.testing.assert_array_equal(y, jnp.broadcast_to(params.bias, x.shape))
    grads = jax.grad(
      lambda x, p: jnp.sum(bnjax.batch_norm(x, p, stats, train=True, mask=mask)[0] ** 2), argnums=(0, 1)
    )(x, params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # One empty feature among others: only it gives the bias and keeps its statistics.
  mask = np.ones((8, 3), bool)
  mask[:, 1] = False
  y, new_stats = bnjax.batch_norm(x, params, stats, train=True, mask=mask)
  np.testing.assert_array_equal(y[:, 1], 1.0)
  np.testing.assert_allclose(
    y[:, 0],
    bnjax.batch_norm(
      x[:, :1], params._replace(scale=params.scale[:1], bias=params.bias[:1]), bnjax.init(1)[1], train=True
    )[0][:, 0],
    atol=1e-6,
  )
  assert new_stats.mean[1] == stats.mean[1] and new_stats.mean[0] != stats.mean[0]


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("dtype,atol", [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_low_precision_inputs_accumulate_in_float32(dtype, atol):
  x, dy, gamma, beta, axes = _inputs((256, 8), -1, loc=50.0, scale=3.0)
  xl = jnp.asarray(x).astype(dtype)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(8)
  y, new_stats, dx, _ = _vjp(xl, params, stats, jnp.asarray(dy).astype(dtype))
  # The reference sees the same rounded input, so only the computation's error is measured.
  want = ref.forward_backward(
    np.asarray(xl.astype(jnp.float32)), gamma, beta, np.asarray(jnp.asarray(dy).astype(dtype).astype(jnp.float32)), axes
  )
  assert y.dtype == dtype and dx.dtype == dtype
  assert new_stats.mean.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), want["y"], atol=atol * 4, rtol=atol)
  np.testing.assert_allclose(new_stats.mean, 0.01 * want["mean"], rtol=1e-5)
  np.testing.assert_allclose(new_stats.var, 0.99 + 0.01 * want["var"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx, np.float32), want["dx"], atol=atol * 4, rtol=atol * 4)


@pytest.mark.usefixtures("formulation")
def test_variance_is_exact_when_the_mean_dwarfs_the_spread():
  x = 1e4 + jax.random.normal(jax.random.key(0), (4096, 4))
  params, stats = bnjax.init(4)
  y, _ = jax.jit(lambda x: bnjax.batch_norm(x, params, stats, train=True))(x)
  np.testing.assert_allclose(np.std(np.asarray(y, np.float64), axis=0), 1.0, atol=1e-3)
  _, var = bnjax.moments(x)
  np.testing.assert_allclose(var, np.var(np.asarray(x, np.float64), axis=0), rtol=1e-3)


@pytest.mark.parametrize(
  "kw", [{}, {"mask": np.arange(36).reshape(12, 3) % 4 > 0}, {"virtual_batch_size": 4}, {"axis": (0, 2)}]
)
@pytest.mark.usefixtures("formulation")
def test_derivatives_to_second_order_forward_and_reverse(kw):
  with jax.enable_x64(True):
    shape = (12, 3, 2)
    kw = dict(kw)
    axis = kw.pop("axis", -1)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64) * 2 + 1
    axes = (axis,) if isinstance(axis, int) else axis
    fshape = tuple(shape[a] for a in axes)
    params, stats = bnjax.init(fshape, dtype=jnp.float64)
    scale = 1.0 + 0.1 * jnp.arange(np.prod(fshape), dtype=jnp.float64).reshape(fshape)
    bias = 0.1 * jnp.ones(fshape, jnp.float64)

    def f(x, scale, bias):
      y, s = bnjax.batch_norm(x, bnjax.BatchNormParams(scale, bias), stats, train=True, axis=axis, **kw)
      return y, s.mean, s.var

    jax.test_util.check_grads(f, (x, scale, bias), order=2, modes=("fwd", "rev"))


@pytest.mark.usefixtures("formulation")
def test_custom_rule_agrees_with_plain_autodiff_of_the_formula():
  x, dy, gamma, beta, _ = _inputs((16, 5), -1)
  _, stats = bnjax.init(5)

  def plain(x, g, b):
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return g * (x - mean) / jnp.sqrt(var + 1e-5) + b

  def ours(x, g, b):
    return bnjax.batch_norm(x, bnjax.BatchNormParams(g, b), stats, train=True)[0]

  loss = lambda fn: lambda *a: jnp.sum(jnp.tanh(fn(*a)) * dy[: a[0].shape[0]])
  chex.assert_trees_all_close(
    jax.grad(loss(ours), (0, 1, 2))(x, gamma, beta), jax.grad(loss(plain), (0, 1, 2))(x, gamma, beta), atol=2e-5
  )
  tangent = (dy, gamma, beta)
  chex.assert_trees_all_close(
    jax.jvp(ours, (x, gamma, beta), tangent), jax.jvp(plain, (x, gamma, beta), tangent), atol=2e-5
  )
  h_ours = jax.hessian(lambda x: loss(ours)(x, gamma, beta))(x[:8])
  h_plain = jax.hessian(lambda x: loss(plain)(x, gamma, beta))(x[:8])
  np.testing.assert_allclose(h_ours, h_plain, atol=5e-4)


def test_no_scale_no_bias():
  x, dy, _, _, axes = _inputs((16, 4), -1)
  params, stats = bnjax.init(4, use_scale=False, use_bias=False)
  assert params.scale is None and params.bias is None
  y, _, dx, dparams = _vjp(x, params, stats, dy)
  want = ref.forward_backward(x, np.ones(4), np.zeros(4), dy, axes)
  np.testing.assert_allclose(y, want["y"], atol=1e-5)
  np.testing.assert_allclose(dx, want["dx"], atol=1e-5, rtol=1e-4)
  assert dparams.scale is None and dparams.bias is None


@pytest.mark.usefixtures("formulation")
def test_vmap_over_an_ensemble_keeps_members_apart():
  members = 3
  xs = jax.random.normal(jax.random.key(0), (members, 16, 4)) * jnp.arange(1, 4)[:, None, None]
  params, stats = jax.vmap(lambda _: bnjax.init(4))(jnp.arange(members))
  params = params._replace(scale=params.scale * jnp.arange(1, 4)[:, None])
  ys, new_stats = jax.vmap(lambda x, p, s: bnjax.batch_norm(x, p, s, train=True))(xs, params, stats)
  for i in range(members):
    p_i, s_i = jax.tree.map(lambda a: a[i], (params, stats))
    y_i, ns_i = bnjax.batch_norm(xs[i], p_i, s_i, train=True)
    np.testing.assert_allclose(ys[i], y_i, atol=1e-6)
    # atol: a near-zero running mean, summed in another order under vmap (GPUs), is off in its last bits.
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], new_stats), ns_i, atol=1e-7)


def test_no_retracing_for_new_array_values():
  params, stats = bnjax.init(4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, params, stats, decay):
    return bnjax.batch_norm(x, params, stats, train=True, decay=decay)

  for i in range(4):
    x = jax.random.normal(jax.random.key(i), (8, 4))
    _, stats = step(x, params, stats, jnp.float32(0.9 + 0.01 * i))


def test_running_rules():
  params, stats = bnjax.init(3)
  batches = [np.random.default_rng(i).normal(i, 1 + i, (10, 3)).astype(np.float32) for i in range(4)]
  means = [b.mean(0) for b in batches]
  s_deb, s_cum = stats, stats
  for b in batches:
    _, s_deb = bnjax.batch_norm(b, params, s_deb, train=True, decay=0.8, running="ema_debiased")
    _, s_cum = bnjax.batch_norm(b, params, s_cum, train=True, running="cumulative")
    if int(s_deb.count) == 1:
      np.testing.assert_allclose(s_deb.mean, means[0], rtol=1e-6)  # debiased: exact after one step
  np.testing.assert_allclose(s_cum.mean, np.mean(means, axis=0), rtol=1e-5)
  weights = 0.8 ** np.arange(3, -1, -1) * 0.2
  np.testing.assert_allclose(s_deb.mean, (weights[:, None] * means).sum(0) / weights.sum(), rtol=1e-5)


@pytest.mark.usefixtures("formulation")
def test_virtual_batches_normalize_each_group_alone():
  x, _, gamma, beta, axes = _inputs((12, 3), -1)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(3)
  y, new_stats = bnjax.batch_norm(x, params, stats, train=True, virtual_batch_size=4)
  groups = [ref.forward_backward(x[i : i + 4], gamma, beta, x[i : i + 4], axes) for i in (0, 4, 8)]
  np.testing.assert_allclose(y, np.concatenate([g["y"] for g in groups]), atol=1e-5)
  np.testing.assert_allclose(new_stats.mean, 0.01 * np.mean([g["mean"] for g in groups], 0), atol=1e-6)


@pytest.mark.usefixtures("formulation")
def test_moments_and_normalize_are_the_pieces_of_train_mode():
  x, _, gamma, beta, _ = _inputs((4, 6, 5, 3), 1)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(6)
  mean, var = bnjax.moments(x, axis=1)
  y = bnjax.normalize(x, mean, var, params, axis=1)
  y_train, _ = bnjax.batch_norm(x, params, stats, train=True, axis=1)
  np.testing.assert_allclose(y, y_train, atol=1e-5)
  np.testing.assert_allclose(mean, np.asarray(x, np.float64).mean((0, 2, 3)), rtol=1e-5)


def _draw_layout(data, *, max_size: int, extra_rows: int):
  """A shape of rank 2-4 whose axis 0 has at least `1 + extra_rows` rows, feature axes drawn from the others,
  and a seed."""
  ndim = data.draw(st.integers(2, 4), label="ndim")
  shape = tuple(data.draw(st.lists(st.integers(1, max_size), min_size=ndim, max_size=ndim), label="shape"))
  shape = (shape[0] + extra_rows,) + shape[1:]
  n_axes = data.draw(st.integers(1, ndim - 1), label="n_axes")
  axes = tuple(sorted(data.draw(st.permutations(range(1, ndim)), label="perm")[:n_axes]))
  return shape, axes, data.draw(st.integers(0, 2**16), label="seed")


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_property_random_shapes_axes_and_masks(data):
  shape, axes, seed = _draw_layout(data, max_size=5, extra_rows=2)
  use_mask = data.draw(st.booleans(), label="use_mask")
  x, dy, gamma, beta, _ = _inputs(shape, axes, seed=seed)
  reduced = tuple(d for i, d in enumerate(shape) if i not in axes)
  mask = None
  if use_mask:
    mask = np.random.default_rng(seed).random(reduced) < 0.7
    mask.reshape(-1)[:2] = True  # at least two rows count
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(gamma.shape)
  y, new_stats, dx, dparams = _vjp(x, params, stats, dy, axis=axes, mask=mask)
  want = ref.forward_backward(x, gamma, beta, dy, axes, mask=mask)
  np.testing.assert_allclose(y, want["y"], atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(dx, want["dx"], atol=2e-3, rtol=1e-3)
  np.testing.assert_allclose(dparams.scale, want["dscale"], atol=1e-3, rtol=1e-4)
  np.testing.assert_allclose(new_stats.mean, 0.01 * want["mean"], atol=1e-5)


@pytest.mark.usefixtures("formulation")
def test_low_precision_forward_mode_matches_float32():
  x, dy, gamma, beta, _ = _inputs((64, 4), -1, loc=20.0)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(4)
  f = lambda x: bnjax.batch_norm(x, params, stats, train=True)[0]
  xb, tb = jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(dy).astype(jnp.bfloat16)
  _, t_low = jax.jvp(f, (xb,), (tb,))
  _, t_ref = jax.jvp(f, (xb.astype(jnp.float32),), (tb.astype(jnp.float32),))
  assert t_low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(t_low, np.float32), t_ref, atol=0.15, rtol=0.03)


@pytest.mark.parametrize("shape,axis", [((16, 3), -1), ((4, 5, 3), -1), ((4, 3, 5), 1)])
def test_per_element_mask_each_feature_over_its_own_values(shape, axis):
  x, dy, gamma, beta, axes = _inputs(shape, axis)
  mask = np.random.default_rng(1).random(shape) < 0.6
  mask[(0,) * len(shape)] = mask[(1,) * len(shape)] = True
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(gamma.shape)
  y, new_stats, dx, dparams = _vjp(x, params, stats, dy, axis=axis, mask=mask)
  moved = lambda a: np.moveaxis(a, axes[0], -1).reshape(-1, gamma.size)  # noqa: E731
  xs, dys, ms, ys, dxs = (moved(a) for a in (x, dy, mask, y, dx))
  for j in range(gamma.size):
    want = ref.forward_backward(
      xs[:, j : j + 1], gamma[j : j + 1], beta[j : j + 1], dys[:, j : j + 1], (1,), mask=ms[:, j]
    )
    np.testing.assert_allclose(ys[:, j], want["y"][:, 0], atol=1e-5)
    np.testing.assert_allclose(dxs[:, j], want["dx"][:, 0], atol=1e-5)
    np.testing.assert_allclose(dparams.scale[j], want["dscale"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new_stats.mean[j], 0.99 * 0 + 0.01 * want["mean"][0], rtol=1e-5)


@pytest.mark.usefixtures("formulation")
def test_complex_input_complex_mean_real_variance_and_gradients():
  rng = np.random.default_rng(0)
  x = (rng.normal(1, 2, (12, 3)) + 1j * rng.normal(-1, 1, (12, 3))).astype(np.complex64)
  params, stats = bnjax.init(3)
  y, new_stats = bnjax.batch_norm(x, params, stats, train=True, decay=0.0)
  mean = x.astype(np.complex128).mean(0)
  var = (np.abs(x - mean) ** 2).mean(0)
  assert y.dtype == jnp.complex64 and new_stats.var.dtype == jnp.float32
  np.testing.assert_allclose(new_stats.mean, mean, rtol=1e-5)
  np.testing.assert_allclose(new_stats.var, var, rtol=1e-5)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)

  def formula(x, scale):  # plain autodiff of the same function, the custom rule's reference
    mu = jnp.mean(x, 0)
    return scale * (x - mu) * jax.lax.rsqrt(jnp.mean(jnp.abs(x - mu) ** 2, 0) + 1e-5)

  def loss(f):
    return lambda x, s: jnp.sum(jnp.abs(f(x, s) - 0.3j) ** 2)

  got = jax.grad(
    loss(lambda x, s: bnjax.batch_norm(x, params._replace(scale=s), stats, train=True)[0]), argnums=(0, 1)
  )(x, params.scale)
  want = jax.grad(loss(formula), argnums=(0, 1))(x, params.scale)
  chex.assert_trees_all_close(got, want, atol=1e-5)


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("shape", [(8, 3), (8, 4, 3)])
def test_per_example_vmap_with_axis_name_equals_the_batch(shape):
  x, dy, gamma, beta, _ = _inputs(shape, -1)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(3)

  def loss(x, params, **kw):
    y, new_stats = bnjax.batch_norm(x, params, stats, train=True, **kw)
    return jnp.sum(y * dy), new_stats

  (_, stats0), grads0 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
  per_example = jax.vmap(lambda x, dy: bnjax.batch_norm(x, params, stats, train=True, axis_name="b")[0], axis_name="b")
  # (N, T, D): each example's T values are summed before the named axis, another order than the batch's.
  np.testing.assert_allclose(per_example(x, dy), bnjax.batch_norm(x, params, stats, train=True)[0], atol=1e-6)
  grad_x = jax.grad(lambda x: jnp.sum(per_example(x, dy) * dy))(x)
  np.testing.assert_allclose(grad_x, grads0[0], atol=1e-6)
  stats_v = jax.vmap(lambda x: loss(x, params, axis_name="b")[1], axis_name="b")(x)
  chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], stats_v), stats0)


@pytest.mark.usefixtures("formulation")
def test_batch_of_one_is_refused_unless_allowed_and_then_gives_bias():
  params, stats = bnjax.init(3)
  params = params._replace(bias=jnp.arange(3.0))
  x = jnp.ones((1, 3))
  with pytest.raises(ValueError, match=r"1 value per feature.*allow_batch_of_one=True"):
    bnjax.batch_norm(x, params, stats, train=True)
  y, new_stats = bnjax.batch_norm(x, params, stats, train=True, allow_batch_of_one=True, decay=0.5)
  np.testing.assert_array_equal(y, params.bias[None])
  np.testing.assert_allclose(new_stats.var, 0.5)  # half of the old 1, half of the batch's 0


def test_eval_mode_takes_an_unbatched_input():
  params, stats = bnjax.init(3)
  stats = stats._replace(mean=jnp.arange(3.0), var=jnp.full(3, 4.0))
  x = jnp.array([1.0, 2.0, 3.0])
  y, _ = bnjax.batch_norm(x, params, stats, train=False, epsilon=1e-6)
  np.testing.assert_allclose(y, (x - stats.mean) / np.sqrt(4.0 + 1e-6), rtol=1e-6)


@settings(deadline=None, max_examples=30)
@given(data=st.data())
def test_property_broadcastable_masks_per_feature(data):
  shape, axes, seed = _draw_layout(data, max_size=4, extra_rows=3)
  ndim = len(shape)
  # Flax's form: each axis of the mask either x's size or 1, leading axes possibly dropped.
  ones = data.draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim), label="size_one")
  mask_shape = tuple(1 if one else d for d, one in zip(shape, ones))
  leading_ones = next((i for i, m in enumerate(mask_shape) if m != 1), ndim)
  mask_shape = mask_shape[data.draw(st.integers(0, min(leading_ones, ndim - 1)), label="dropped") :]
  # A mask shaped like x without its feature axes is the row form, whatever its rank.
  assume(mask_shape != tuple(d for i, d in enumerate(shape) if i not in axes))
  x, _, gamma, beta, _ = _inputs(shape, axes, seed=seed)
  mask = np.random.default_rng(seed).random(mask_shape) < 0.7
  full = np.broadcast_to(mask, shape)
  params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
  _, stats = bnjax.init(gamma.shape)
  y, new_stats = jax.jit(lambda x, m: bnjax.batch_norm(x, params, stats, train=True, axis=axes, mask=m, decay=0.0))(
    x, mask
  )
  rest = [i for i in range(ndim) if i not in axes]
  to_rows = lambda a: np.transpose(a, rest + list(axes)).reshape(-1, gamma.size)  # noqa: E731
  xr, mr, yr = to_rows(x.astype(np.float64)), to_rows(full), to_rows(np.asarray(y))
  for j in range(gamma.size):
    values = xr[mr[:, j], j]
    if values.size == 0:  # no value for this feature: y = bias, statistics kept
      np.testing.assert_array_equal(yr[:, j], beta.reshape(-1)[j])
      continue
    mean, var = values.mean(), values.var()
    want = (xr[:, j] - mean) / np.sqrt(var + 1e-5) * gamma.reshape(-1)[j] + beta.reshape(-1)[j]
    np.testing.assert_allclose(yr[:, j], want, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(new_stats.var).reshape(-1)[j], var, atol=1e-4, rtol=1e-4)
