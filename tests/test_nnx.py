"""bnjax.nnx.BatchNorm is a drop-in for flax.nnx.BatchNorm: variables, training with nnx.Optimizer, modes."""

import flax.linen as linen
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax.nnx as bnnx

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _layout(state):
  """Path -> (variable type, shape, dtype): what `nnx.update` / `nnx.merge` need to match."""
  return {path: (type(v).__name__, v.shape, v.dtype) for path, v in nnx.to_flat_state(state)}


class Net(nnx.Module):
  """x -> BatchNorm -> elementwise weight: the BatchNorm class is the only difference between models."""

  def __init__(self, bn_cls, num_features, x_shape, **bn_kwargs):
    self.bn = bn_cls(num_features, rngs=nnx.Rngs(0), **bn_kwargs)
    self.w = nnx.Param(jnp.asarray(helpers.normal(x_shape[1:], seed=7)))

  def __call__(self, x):
    return self.bn(x) * self.w[...]


def _loss(model, x, t):
  y = model(x)
  return jnp.mean((y.astype(jnp.float32) - t) ** 2), y


def _train(model, xs, targets, lr=0.1):
  """SGD steps with nnx.Optimizer (one compiled scan over split / merged state), then eval.

  Returns per step (output, batch statistics, grads of params, grad of x), the final state of the model
  and the eval output on `xs[0]`; `model` is updated in place.
  """
  optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, batch):
    x, t = batch
    model, optimizer = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)
    (_, y), (grads, g_x) = grad_fn(model, x, t)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), (y, nnx.state(model, nnx.BatchStat), grads, g_x)

  @helpers.fast_jit
  def run(state, xs, targets):
    state, history = jax.lax.scan(step, state, (xs, targets))
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return state, history, model(xs[0])

  state, history, y_eval = run(state, xs, targets)
  nnx.update((model, optimizer), state)
  return history, nnx.state(model), y_eval


def _batches(shape, dtype, n=5, seed=0):
  """`n` stacked input batches (mean 3, std 2, so that the statistics matter) and regression targets."""
  return jnp.asarray(3.0 + 2.0 * helpers.normal((n, *shape), seed), dtype), jnp.asarray(
    helpers.normal((n, *shape), seed + 1)
  )


def _check_equivalent(shape, axis, x_dtype, tol, **bn_kwargs):
  """Same model with flax's and bnjax's nnx BatchNorm: same state, trajectory, gradients and eval."""
  xs, targets = _batches(shape, x_dtype)
  num_features = shape[axis]
  flax_model = Net(nnx.BatchNorm, num_features, shape, axis=axis, momentum=0.9, use_fast_variance=False, **bn_kwargs)
  ours = Net(bnnx.BatchNorm, num_features, shape, axis=axis, momentum=0.9, **bn_kwargs)
  assert _layout(nnx.state(flax_model)) == _layout(nnx.state(ours))
  helpers.close(nnx.state(flax_model), nnx.state(ours), dict(rtol=0, atol=0), "init state")

  f_hist, f_final, f_eval = _train(flax_model, xs, targets)
  o_hist, o_final, o_eval = _train(ours, xs, targets)
  grad_x_tol = tol if x_dtype == jnp.float32 else BF16_TOL  # x's dtype: within one bfloat16 ulp
  assert f_hist[0].dtype == o_hist[0].dtype and f_hist[3].dtype == o_hist[3].dtype
  for i in range(len(xs)):
    f, o = jax.tree.map(lambda h: h[i], (f_hist, o_hist))
    helpers.close(f[:3], o[:3], tol, f"training step {i}: (output, batch stats, grad params)")
    helpers.close(f[3], o[3], grad_x_tol, f"training step {i}: grad x")
  helpers.close(f_final, o_final, tol, "final state")
  helpers.close(f_eval, o_eval, tol, "eval output")

  # State trained with one class loads into the other (nnx.merge of the other's graphdef), both ways.
  f_graphdef, o_graphdef = nnx.graphdef(flax_model), nnx.graphdef(ours)

  @helpers.fast_jit
  def swapped(state, x):
    outputs = []
    for graphdef in (f_graphdef, o_graphdef):
      model = nnx.merge(graphdef, state, copy=True)  # the first model's updates must not reach the second
      y_train = model(x)
      model.eval()
      outputs.append((y_train, model(x), nnx.state(model, nnx.BatchStat)))
    return outputs

  for state in (f_final, o_final):
    by_flax, by_ours = swapped(state, xs[1])
    helpers.close(by_flax, by_ours, tol, "state from the other class")


CASES = [
  ((16, 6), -1, jnp.float32),
  ((8, 4, 5), -1, jnp.float32),
  ((4, 3, 5, 6), 1, jnp.float32),  # NCHW
  ((4, 3, 5, 6), 1, jnp.bfloat16),
]


@pytest.mark.parametrize("shape,axis,dtype", CASES, ids=[f"{s}-ax{a}-{jnp.dtype(d).name}" for s, a, d in CASES])
def test_matches_flax_nnx_with_optimizer(shape, axis, dtype):
  _check_equivalent(shape, axis, dtype, F32_TOL)


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False), (False, False)])
def test_matches_flax_nnx_without_scale_or_bias(use_scale, use_bias):
  _check_equivalent((8, 4, 5), -1, jnp.float32, F32_TOL, use_scale=use_scale, use_bias=use_bias)


def test_matches_flax_nnx_in_bfloat16_compute():
  # dtype=bfloat16: flax normalizes in bfloat16 arithmetic, bnjax in float32 with one final rounding.
  _check_equivalent((16, 6), -1, jnp.bfloat16, BF16_TOL, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


@pytest.mark.parametrize("num_features", [15, (5, 3)])
def test_several_feature_axes_match_flax_linen(num_features):
  # flax.nnx.BatchNorm cannot update its statistics with several feature axes; bnjax's can, with the
  # numbers of flax.linen.BatchNorm(axis=(1, 2)).
  x = 1.0 + helpers.normal((6, 5, 3, 2), 1)
  layer = bnnx.BatchNorm(
    num_features,
    axis=(1, 2),
    momentum=0.5,
    scale_init=nnx.initializers.constant(1.5),
    bias_init=nnx.initializers.constant(0.25),
    rngs=nnx.Rngs(0),
  )
  assert layer.mean.shape == layer.scale.shape == (num_features if isinstance(num_features, tuple) else (15,))
  graphdef, state = nnx.split(layer)
  linen_layer = linen.BatchNorm(use_running_average=False, axis=(1, 2), momentum=0.5, use_fast_variance=False)
  linen_vars = {
    "params": {"scale": np.full((5, 3), 1.5, np.float32), "bias": np.full((5, 3), 0.25, np.float32)},
    "batch_stats": {"mean": np.zeros((5, 3), np.float32), "var": np.ones((5, 3), np.float32)},
  }

  @helpers.fast_jit
  def run(state, x):
    def loss(state):
      model = nnx.merge(graphdef, state)
      y = model(x)
      return jnp.sum(y * x), (y, nnx.state(model, nnx.BatchStat))

    def linen_loss(params):
      y, updates = linen_layer.apply({**linen_vars, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(y * x), (y, updates["batch_stats"])

    ours = jax.grad(loss, has_aux=True)(state)
    return ours, jax.grad(linen_loss, has_aux=True)(linen_vars["params"])

  (o_grads, (o_y, o_stats)), (l_grads, (l_y, l_stats)) = run(state, x)
  helpers.close(o_y, l_y, F32_TOL)
  helpers.close(
    {"mean": o_stats["mean"][...].reshape(5, 3), "var": o_stats["var"][...].reshape(5, 3)}, l_stats, F32_TOL
  )
  helpers.close({k: o_grads[k][...].reshape(5, 3) for k in ("scale", "bias")}, l_grads, F32_TOL)


def test_modes_train_eval_view_and_call_argument():
  x = 2.0 + helpers.normal((8, 4), 1)
  model = Net(bnnx.BatchNorm, 4, x.shape)

  def running_mean():
    return np.asarray(model.bn.mean[...])

  model.eval()
  assert model.bn.use_running_average is True
  before = running_mean()
  model(x)
  np.testing.assert_array_equal(running_mean(), before, "eval() must not update the statistics")
  model.bn(x, use_running_average=False)  # the call argument wins over the attribute
  assert not np.allclose(running_mean(), before)

  model.train()
  assert model.bn.use_running_average is False
  before = running_mean()
  nnx.view(model, use_running_average=True)(x)
  np.testing.assert_array_equal(running_mean(), before, "a use_running_average=True view must not update")
  model(x)
  assert not np.allclose(running_mean(), before)

  no_mode = bnnx.BatchNorm(4, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use_running_average"):
    no_mode(x)


def test_optimizer_updates_params_not_statistics():
  # nnx.Optimizer(wrt=nnx.Param) trains scale and bias; the running statistics, including the batch counter
  # of running="cumulative", are state that the layer moves itself.
  x = 2.0 + helpers.normal((16, 3), 1)
  model = Net(bnnx.BatchNorm, 3, x.shape, running="cumulative", momentum=0.9)
  assert set(dict(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))) == {
    ("bn", "count"),
    ("bn", "mean"),
    ("bn", "var"),
  }
  _, final, _ = _train(model, jnp.stack([x, 2.0 * x]), jnp.zeros((2, 16, 3)))
  bn_state = final["bn"]
  assert int(bn_state["count"][...]) == 2
  # cumulative: the plain average of the two batches' statistics.
  helpers.close(bn_state["mean"][...], 1.5 * x.mean(0), F32_TOL)
  helpers.close(bn_state["var"][...], 2.5 * x.var(0), F32_TOL)
  assert not np.allclose(np.asarray(bn_state["scale"][...]), 1.0)


def test_axis_name_under_vmap_matches_flax_and_the_whole_batch():
  x = 2.0 + helpers.normal((4, 8, 6), 0)  # 4 mapped members of 8 rows
  outputs = []
  for cls, extra in ((nnx.BatchNorm, {"use_fast_variance": False}), (bnnx.BatchNorm, {})):
    graphdef, state = nnx.split(cls(6, axis_name="batch", momentum=0.5, rngs=nnx.Rngs(0), **extra))

    def apply(state, x, graphdef=graphdef):
      model = nnx.merge(graphdef, state)
      return model(x), nnx.state(model, nnx.BatchStat)

    outputs.append(helpers.fast_jit(jax.vmap(apply, in_axes=(None, 0), axis_name="batch"))(state, x))
  helpers.close(outputs[0], outputs[1], F32_TOL)
  y, stats = outputs[1]
  whole = x.reshape(32, 6)
  helpers.close(y.reshape(32, 6), (whole - whole.mean(0)) / np.sqrt(whole.var(0) + 1e-5), F32_TOL)
  for member in range(4):
    helpers.close(stats["mean"][...][member], 0.5 * whole.mean(0), F32_TOL)
    helpers.close(stats["var"][...][member], 0.5 + 0.5 * whole.var(0), F32_TOL)


def test_mask_matches_flax_nnx():
  x = 1.0 + helpers.normal((12, 5, 3), 0)
  rows = np.arange(12 * 5).reshape(12, 5) % 3 != 0

  @helpers.fast_jit
  def run(x):
    flax_layer = nnx.BatchNorm(3, momentum=0.0, use_fast_variance=False, rngs=nnx.Rngs(0))
    expected = flax_layer(x, mask=rows[..., None]), nnx.state(flax_layer, nnx.BatchStat)
    got = []
    for mask in (rows, rows[..., None], np.broadcast_to(rows[..., None], x.shape)):
      layer = bnnx.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
      got.append((layer(x, mask=mask), nnx.state(layer, nnx.BatchStat)))
    return expected, got

  expected, got = run(x)
  for result in got:
    helpers.close(result, expected, F32_TOL)
  helpers.close(got[0][1]["mean"][...], x[rows].mean(0), F32_TOL)


@pytest.mark.parametrize(
  "x_dtype,kwargs",
  [
    (jnp.bfloat16, {}),
    (jnp.float32, {"dtype": jnp.bfloat16}),
    (jnp.bfloat16, {"param_dtype": jnp.bfloat16}),
  ],
)
def test_dtypes_follow_flax_nnx(x_dtype, kwargs):
  x = jnp.asarray(1.0 + helpers.normal((16, 4), 1), x_dtype)

  @helpers.fast_jit
  def run(x):
    results = []
    for cls, extra in ((nnx.BatchNorm, {"use_fast_variance": False}), (bnnx.BatchNorm, {})):
      layer = cls(4, rngs=nnx.Rngs(0), **kwargs, **extra)
      y = layer(x)
      results.append((y, layer(x, use_running_average=True), nnx.state(layer)))
    return results

  (f_y, f_eval, f_state), (o_y, o_eval, o_state) = run(x)
  assert _layout(f_state) == _layout(o_state)
  assert o_y.dtype == f_y.dtype and o_eval.dtype == f_eval.dtype
  helpers.close((f_y, f_eval, f_state), (o_y, o_eval, o_state), BF16_TOL)


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": "4"}, TypeError, "num_features"),
    ({"momentum": 2.0}, ValueError, "momentum"),
    ({"epsilon": -1e-5}, ValueError, "epsilon"),
    ({"axis": 1.0}, TypeError, "axis"),
    ({"axis_index_groups": [[0, 1]]}, ValueError, "axis_index_groups"),
    ({"virtual_batch_size": -2}, ValueError, "virtual_batch_size"),
    ({"running": "ema_unbiased"}, ValueError, "running"),
    ({"use_running_average": 1}, TypeError, "use_running_average"),
    ({"rngs": 0}, TypeError, "rngs"),
  ],
)
def test_constructor_errors_name_the_argument(kwargs, error, match):
  arguments = {"num_features": 4, "rngs": nnx.Rngs(0), **kwargs}
  with pytest.raises(error, match=match):
    bnnx.BatchNorm(**arguments)


def test_call_errors_name_the_argument():
  layer = bnnx.BatchNorm(4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_features=4"):
    jax.eval_shape(layer, jnp.ones((8, 5)))
  with pytest.raises(ValueError, match="`axis`=-1 is out of range"):
    jax.eval_shape(layer, jnp.ones(()))
